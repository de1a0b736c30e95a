"""The error-bounded codec: every element within eb, exact where it must be, and the format's size
counted independently (bits of each block's residuals recounted in Python integers)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from facto_fx import eb_format
from facto_fx.ops import eb_codec
from facto_fx.shapes import is_channels_last

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def round_trip(x: torch.Tensor, eb: float) -> tuple[torch.Tensor, eb_format.Codes]:
    codes = eb_codec.compress(x, eb)
    return eb_codec.decompress(codes, x.shape, x.dtype, eb, is_channels_last(x)), codes


def assert_within(x: torch.Tensor, x_hat: torch.Tensor, eb: float) -> None:
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    finite = torch.isfinite(x)
    assert torch.equal(torch.isfinite(x_hat), finite)
    assert ((x_hat.double() - x.double()).abs()[finite] <= eb).all()
    assert torch.equal(x_hat[~finite].double().nan_to_num(1.5), x[~finite].double().nan_to_num(1.5))


def inputs(kind: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if kind == "sparse":
        x = x.relu() * (torch.rand(shape, generator=g) < 0.3)
    elif kind == "constant":
        x = torch.full(shape, 0.737)
    elif kind == "huge":
        x = x * 1e30
    elif kind == "tiny":
        x = x * 1e-30
    return x.to(dtype)


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["normal", "sparse", "constant", "huge", "tiny"]),
    numel=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    eb=st.sampled_from([1e-6, 1e-3, 0.05, 1.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_bound_holds_for_every_element(kind, numel, dtype, eb, seed):
    x = inputs(kind, (numel,), dtype, seed)
    x_hat, _ = round_trip(x, eb)
    assert_within(x, x_hat, eb)


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_exact_where_steps_are_exact(dtype):
    """Values on the quantisation grid (multiples of 2eb, eb a power of two) come back exactly."""
    eb = 2.0**-4
    x = (torch.randint(-200, 200, (3, 5, 7, 11)) * 2 * eb).to(dtype)
    x_hat, codes = round_trip(x, eb)
    assert torch.equal(x_hat, x) and codes.outlier_index.numel() == 0


def test_zeros_cost_one_byte_per_block_and_stay_zero():
    x = torch.zeros(4, 8, 32)  # 1024 values, 32 blocks
    x[0, 0, 3] = 1.0
    x_hat, codes = round_trip(x, 0.01)
    assert torch.equal(x_hat, x)
    # 32 width bytes; one block holds a residual of round(1 / 0.02) = 50 (6 bits) then -50: sign + 6 planes.
    assert codes.nbytes == 32 + 4 * (1 + 6)


def test_nan_and_inf_are_kept_exactly():
    x = torch.randn(100)
    x[[3, 40, 99]] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    x_hat, codes = round_trip(x, 0.1)
    assert_within(x, x_hat, 0.1)
    assert codes.outlier_index.tolist() == [3, 40, 99]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layouts(layout, dtype):
    x = inputs("sparse", (2, 5, 7, 9), dtype, 0)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.transpose(2, 3)
    x_hat, _ = round_trip(x, 0.02)
    assert_within(x, x_hat, 0.02)
    assert x_hat.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


def test_batch_one_and_empty():
    x = torch.randn(1, 3, 1, 1)
    assert_within(x, round_trip(x, 0.1)[0], 0.1)
    x_hat, codes = round_trip(torch.empty(0, 3), 0.1)
    assert x_hat.shape == (0, 3) and codes.nbytes == 0


def expected_bytes(q: list[int]) -> int:
    """The format's size recounted from the int codes: one byte per block of 32, and for each block
    with a nonzero residual a sign word and one word per bit of its largest residual."""
    size = 0
    for start in range(0, len(q), 32):
        block = q[start:start + 32] + [0] * (32 - len(q[start:start + 32]))
        residuals = [block[0]] + [b - a for a, b in zip(block, block[1:], strict=False)]
        bits = max(abs(r) for r in residuals).bit_length()
        size += 1 + (4 * (1 + bits) if bits else 0)
    return size


@pytest.mark.parametrize("numel", [1, 31, 33, 257])
def test_size_matches_the_format(numel):
    x = inputs("normal", (numel,), torch.float32, numel)
    eb = 0.003
    codes = eb_codec.compress(x, eb)
    q = [round(v / (2 * eb)) for v in x.double().tolist()]
    assert codes.nbytes == expected_bytes(q)


def test_ratio_grows_with_the_bound():
    x = inputs("sparse", (8, 16, 16, 16), torch.float32, 1)
    sizes = [eb_codec.compress(x, eb).nbytes for eb in (1e-4, 1e-3, 1e-2, 1e-1)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 2 * sizes[-1]


def test_opposite_clamped_codes_keep_the_bound():
    x = torch.tensor([-(2.0**30), 2.0**30, 3.0])
    assert_within(x, round_trip(x, 0.5)[0], 0.5)


@pytest.mark.parametrize("eb", [0, -1.0, float("nan"), float("inf"), True, "0.1", 1e-47, 1e39])
def test_bad_bound_is_refused(eb):
    with pytest.raises(ValueError, match="eb"):
        eb_codec.compress(torch.randn(4), eb)


def test_integer_tensor_is_refused():
    with pytest.raises(TypeError, match="float"):
        eb_codec.compress(torch.arange(4), 0.1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_errors_of_exactly_eb_are_within(dtype):
    """Half-way values decode exactly eb away: the check's fp64 path must accept them."""
    eb = 0.25
    x = torch.tensor([0.25, -0.75, 1.25, 2.75, 0.5, -1.0], dtype=dtype)
    x_hat, codes = round_trip(x, eb)
    assert codes.outlier_index.numel() == 0
    assert (x_hat.double() - x.double()).abs().max().item() == eb
