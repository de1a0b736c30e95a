"""Triton error-bounded codec: Codes and reconstruction bit-identical to facto_fx.ops.eb_codec, and
the bound itself, checked directly, on every dtype, layout, odd size and special value."""

import pytest
import torch
from kernel_cases import DTYPES, KernelSpy, channels_last, noncontiguous, randn

from facto_fx import eb_format
from facto_fx.ops import eb_codec as reference
from facto_fx.shapes import is_channels_last
from facto_fx.triton_ops import eb_codec as triton_codec
from facto_fx.triton_ops.eb_codec import compress, decompress

EB = 1e-2

# The interpreter runs the kernels in numpy, which warns where IEEE arithmetic meets NaN and ±inf
# (inf − inf in the rounding, a code times 2eb past fp16's range) — inputs these tests choose.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered in:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")]


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's bit patterns as integers, so NaNs compare equal to themselves and -0.0 differs from 0.0."""
    if not t.is_floating_point():
        return t
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def roundtrip(x: torch.Tensor, eb: float) -> tuple[eb_format.Codes, torch.Tensor]:
    """Triton's (codes, reconstruction) of x, after asserting both equal the reference's bit for bit."""
    codes, expected = compress(x, eb), reference.compress(x, eb)
    for name, got, want in zip(eb_format.Codes._fields, codes, expected, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(bits(got), bits(want)), name
    layout = is_channels_last(x)
    x_hat = decompress(codes, x.shape, x.dtype, eb, layout)
    want = reference.decompress(expected, x.shape, x.dtype, eb, layout)
    assert x_hat.dtype == x.dtype and x_hat.shape == x.shape and x_hat.stride() == want.stride()
    assert torch.equal(bits(x_hat), bits(want))
    return codes, x_hat


def assert_within_bound(x: torch.Tensor, x_hat: torch.Tensor, eb: float) -> None:
    """The contract itself, not equality with the reference: finite elements within eb (in fp64),
    NaN and ±inf back bit for bit."""
    finite = torch.isfinite(x)
    assert ((x_hat[finite].double() - x[finite].double()).abs() <= eb).all()
    assert torch.equal(bits(x_hat[~finite]), bits(x[~finite]))


def spread(shape, dtype, seed=0, scale=3.0) -> torch.Tensor:
    """Normal values at `scale`: codes of several hundred at eb 1e-2, so blocks have various widths;
    the 16-bit dtypes are too coarse there for some values, which become outliers."""
    return (randn(shape, torch.float32, seed) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
def test_matches_reference_in_every_layout(dtype, layout):
    shape = (2, 3, 5, 7)  # 210 values: six full blocks and a ragged one
    if layout == "noncontiguous":
        x = (noncontiguous(shape, torch.float32) * 3).to(dtype)
    else:
        x = spread(shape, dtype)
        x = channels_last(x) if layout == "channels_last" else x
    codes, x_hat = roundtrip(x, EB)
    assert codes.words.numel() > 0 and len(set(codes.widths.tolist())) > 1
    assert_within_bound(x, x_hat, EB)


def test_16_bit_dtypes_have_outliers_and_fp32_none():
    """At eb 1e-2 and |x| ~ 3, bf16's step (2**-6) is coarser than 2eb, so the path that stores
    exact values is exercised; fp32 represents every q·2eb within eb."""
    x = spread((1000,), torch.float32)
    assert roundtrip(x, EB)[0].outlier_index.numel() == 0
    for dtype in (torch.bfloat16, torch.float16):
        assert roundtrip(x.to(dtype), EB)[0].outlier_index.numel() > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [1, 31, 32, 33, 1000 + 7])
def test_odd_sizes(numel, dtype):
    x = spread((numel,), dtype, seed=numel)
    assert_within_bound(x, roundtrip(x, EB)[1], EB)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_zero_input_is_one_byte_per_block(dtype):
    x = torch.zeros(3, 70, dtype=dtype)
    codes, x_hat = roundtrip(x, EB)
    assert codes.nbytes == 7 and codes.words.numel() == 0 and torch.equal(bits(x_hat), bits(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_sparse_input(dtype):
    x = torch.relu(spread((4, 3, 6, 6), dtype, seed=1))
    x.view(-1)[:96] = 0  # three whole blocks of zeros, which cost their width byte only
    codes, x_hat = roundtrip(x, EB)
    assert (codes.widths[:3] == 0).all() and (x_hat[x == 0] == 0).all()
    assert_within_bound(x, x_hat, EB)


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_input(dtype):
    """Only each block's first residual is nonzero."""
    x = torch.full((5, 40), 1.25, dtype=dtype)
    codes, x_hat = roundtrip(x, EB)
    assert codes.widths.tolist() == [6] * 7 and codes.outlier_index.numel() == 0  # q = 62 (62.5, tie to even)
    assert_within_bound(x, x_hat, EB)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_infinities_come_back_bit_for_bit(dtype):
    x = spread((100,), dtype, seed=2)
    x[[3, 40, 41, 99]] = torch.tensor([float("nan"), float("inf"), float("-inf"), float("nan")], dtype=dtype)
    codes, x_hat = roundtrip(x, EB)
    assert {3, 40, 41, 99} <= set(codes.outlier_index.tolist())
    assert_within_bound(x, x_hat, EB)


def test_nan_payload_and_sign_are_kept():
    x = torch.zeros(40)
    x.view(torch.int32)[[0, 5, 39]] = torch.tensor([0x7FC00001, -0x00400001, 0x7F800001], dtype=torch.int32)
    assert torch.equal(bits(roundtrip(x, EB)[1]), bits(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_values_beyond_the_code_range_are_outliers(dtype):
    """|x| / 2eb beyond 2**30 clamps, the clamped code misses the bound, so x is stored exactly."""
    eb = 1e-5
    x = spread((64,), dtype, seed=3)
    x[[0, 10, 33]] = torch.tensor([3e4, -6e4, 2.5e4], dtype=dtype)  # 1.5e9, -3e9 and 1.25e9 steps
    codes, x_hat = roundtrip(x, eb)
    assert {0, 10, 33} <= set(codes.outlier_index.tolist())
    assert_within_bound(x, x_hat, eb)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_bound(dtype):
    """eb 1e-30 (step still a normal fp32): every nonzero value is far beyond the code range."""
    x = spread((3, 33), dtype, seed=4)
    x.view(-1)[::4] = 0
    codes, x_hat = roundtrip(x, 1e-30)
    assert codes.outlier_index.numel() == int((x != 0).sum())
    assert_within_bound(x, x_hat, 1e-30)


@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormal_values(dtype):
    """Subnormal values at the smallest eb allowed (its step, 2e-37, is a normal fp32); bf16 has
    fp32's subnormals, which the interpreter's own bf16 → fp32 cast gets wrong (so the kernels
    widen bf16 by hand)."""
    eb = 1e-37
    x = (randn((70,), torch.float64, seed=5) * 4e-39).to(dtype)
    x[:3] = torch.tensor([1e-45, -3e-42, 0.0]).to(dtype)
    assert_within_bound(x, roundtrip(x, eb)[1], eb)


def test_widest_residuals():
    """Codes of alternating sign just inside ±MAX_CODE = ±2**29 at step 1: residuals need 30 bits,
    so a block takes 31 words (fp32 is exact there: its spacing below 2**29 is 32)."""
    x = torch.tensor([(-1) ** i * (2**29 - 64 * (1 + i % 3)) for i in range(70)], dtype=torch.float32)
    codes, x_hat = roundtrip(x, 0.5)
    assert codes.widths.tolist() == [30, 30, 30] and codes.outlier_index.numel() == 0
    assert_within_bound(x, x_hat, 0.5)


def test_ties_round_to_even():
    """x / 2eb exactly halfway between codes: q as torch.round gives it (both are within eb)."""
    x = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 1e6 + 0.5, -(2.0**22) - 0.5, 0.25, -0.75])
    codes, x_hat = roundtrip(x, 0.5)
    expected = torch.tensor([0.0, 2.0, 2.0, 4.0, -0.0, -2.0, -2.0, 1e6, -(2.0**22), 0.0, -1.0])
    assert codes.outlier_index.numel() == 0 and torch.equal(x_hat, expected)


def test_bf16_decoding_rounds_to_nearest_even():
    """q·2eb is rounded to bf16, not truncated (the interpreter's own fp32 → bf16 cast truncates):
    at eb 1e-3, 4.0625 is q = 2031 of step 0.002, q·step ≈ 4.062, which rounds back to 4.0625 and is
    within the bound, where truncation would give 4.03125, and an outlier."""
    x = torch.tensor([4.0625, -4.0625, 8.125, 0.5, -1.0], dtype=torch.bfloat16)
    codes, x_hat = roundtrip(x, 1e-3)
    assert codes.outlier_index.numel() == 0 and torch.equal(x_hat, x)


def test_clamped_codes_of_opposite_sign_match_the_reference():
    """q = −2**30 then +2**30: the residual 2**31 wraps in int32, in the reference and here alike."""
    x = torch.tensor([-(2.0**30), 2.0**30, 3.0])
    roundtrip(x, 0.5)


def test_clamped_codes_of_opposite_sign_keep_the_bound():
    """Codes clamped at ±MAX_CODE side by side: their residual must still fit int32."""
    x = torch.tensor([-(2.0**30), 2.0**30, 3.0])
    assert_within_bound(x, roundtrip(x, 0.5)[1], 0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_input(dtype):
    x = torch.empty(0, 3, dtype=dtype)
    codes, x_hat = roundtrip(x, EB)
    assert codes.nbytes == 0 and x_hat.shape == (0, 3)


def test_float64_is_left_to_the_pytorch_codec():
    """ops.error_bounded routes fp64 to ops.eb_codec; the kernels refuse it rather than guess."""
    with pytest.raises(TypeError, match="float64"):
        compress(spread((2, 50), torch.float64), 1e-6)


def test_rejects_what_the_reference_rejects():
    with pytest.raises(TypeError):
        compress(torch.ones(3, dtype=torch.int32), EB)
    for eb in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError):
            compress(torch.ones(3), eb)


def test_channels_last_map_is_read_in_place(monkeypatch):
    """The kernels read a channels_last map where it lies (as N·H·W·C), not a copy of it."""
    x = channels_last(spread((2, 3, 5, 7), torch.float32))
    spies = [KernelSpy.install(monkeypatch, triton_codec, name) for name in ("_quantize_kernel", "_pack_kernel")]
    compress(x, EB)
    assert all(spy.launches and spy.launches[0][0].data_ptr() == x.data_ptr() for spy in spies)


def test_one_host_sync_per_compress(monkeypatch):
    """The only read back is the one .tolist() of the word and outlier totals."""
    calls = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(self.numel()) or original(self))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("item() is a host sync"))
    compress(spread((2, 3, 5, 7), torch.float16), EB)
    assert calls == [2]


def test_compressed_call_runs_the_kernels(monkeypatch):
    """compressed_call under kernels='triton' saves the kernels' codes; its gradients equal the
    PyTorch codec's (the two codecs agree bit for bit)."""
    import torch.nn.functional as F

    from facto_fx.ops.error_bound import ErrorBound
    from facto_fx.ops.error_bounded import CompressedFunction
    from facto_fx.triton_ops import eb_codec as kernels
    from facto_fx.triton_ops.dispatch import use_kernels

    calls = []
    for name in ("compress", "decompress"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    grads = []
    for mode in ("triton", "torch"):
        x = randn((2, 3, 5, 7), torch.float32).requires_grad_()
        with use_kernels(mode):
            CompressedFunction(F.silu, ErrorBound(eb=EB))(x).sum().backward()
        grads.append(x.grad)
    assert calls == ["compress", "decompress"] and torch.equal(*grads)
