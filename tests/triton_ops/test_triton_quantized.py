"""Triton quantized store: the kernels' group statistics are the PyTorch path's bit for bit, every
element decodes within one step, codes are unbiased over the (Philox) noise, values on the levels
code exactly as the reference codes them, and the ops read channels_last maps in place.

The noise differs from the PyTorch path's (tl.rand against torch.rand), so codes are compared only
where the noise cannot matter (values on the levels)."""

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import DTYPES, KernelSpy, channels_last, noncontiguous, randn

import facto_fx
from facto_fx.ops import quantized as Q
from facto_fx.ops.bitpack import pack_bits
from facto_fx.triton_ops import quantized as triton_quantized
from facto_fx.triton_ops.quantized import dequantize, quantize

# (shape, group): short last groups, batch 1, odd sample sizes, a 1-d map, several groups a program
SHAPES = [((2, 3, 5, 7), 16), ((1, 5, 3, 3), 8), ((3, 1001), 256), ((37,), 8), ((2, 300), 24)]


def _seed(value=0):
    return torch.tensor(value, dtype=torch.int64)


def _launch(x, bits, group, seed=0, stream=0):
    lay = Q.layout(x.shape, bits, group)
    return quantize(x, _seed(seed), bits, group, lay.samples, lay.sample_size, stream)


def _decode_reference(parts, x, bits, group, dtype=torch.float32):
    return Q.dequantize_reference(*parts, bits, group, x.shape, Q.is_channels_last(x), dtype)


def _scale_per_element(scales, shape, bits, group):
    lay = Q.layout(shape, bits, group)
    rows = scales.view(lay.samples, lay.groups_per_sample).repeat_interleave(group, dim=1)
    return rows[:, : lay.sample_size].reshape(-1)


def _assert_within_one_step(x, parts, bits, group):
    decoded = Q.memory_order(_decode_reference(parts, x, bits, group)).double()
    flat = Q.memory_order(x.contiguous() if not Q.is_channels_last(x) else x).double()
    scale = _scale_per_element(parts[2], x.shape, bits, group).double()
    assert ((decoded - flat).abs() <= scale * (1 + 1e-6) + 1e-6 * flat.abs()).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", Q.QUANTIZED_BITS)
def test_statistics_match_the_reference_and_codes_decode_within_one_step(bits, dtype):
    inputs = [(randn(shape, dtype, seed=i), group) for i, (shape, group) in enumerate(SHAPES)]
    inputs += [(channels_last(randn((2, 6, 5, 3), dtype)), 16), (noncontiguous((2, 3, 5, 6), dtype), 8)]
    for x, group in inputs:
        codes, mins, scales = _launch(x, bits, group, seed=3)
        ref_codes, ref_mins, ref_scales = Q.quantize_reference(x, bits, group, 3)
        assert codes.dtype == torch.uint8 and codes.shape == ref_codes.shape
        assert torch.equal(mins, ref_mins) and torch.equal(scales, ref_scales)
        _assert_within_one_step(x, (codes, mins, scales), bits, group)


@pytest.mark.parametrize("bits", Q.QUANTIZED_BITS)
def test_values_on_the_levels_code_as_the_reference_codes_them(bits):
    """Integers 0 .. 2^b − 1 with both ends in every group: min 0, scale 1, and each code the value,
    whatever the noise; 45 elements a sample, so each sample's last byte is padded with zero codes."""
    levels = (1 << bits) - 1
    g = torch.Generator().manual_seed(bits)
    rows = torch.randint(0, levels + 1, (3, 45), generator=g).float()
    rows[:, ::8], rows[:, 1::8] = 0.0, float(levels)
    x = rows.view(3, 3, 3, 5).permute(0, 3, 1, 2)  # channels_last (3, 5, 3, 3): the rows in memory order
    codes, mins, scales = _launch(x, bits, 8, seed=7)
    assert torch.equal(codes, Q.quantize_reference(x, bits, 8, 1)[0])
    per_byte = 8 // bits
    padded = F.pad(rows, (0, -45 % per_byte)).to(torch.uint8)
    assert torch.equal(codes, pack_bits(padded, bits))
    assert torch.equal(mins, torch.zeros_like(mins)) and torch.equal(scales, torch.ones_like(scales))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", Q.QUANTIZED_BITS)
def test_dequantize_matches_the_reference(bits, dtype):
    for x in (randn((2, 3, 5, 7), dtype), channels_last(randn((2, 6, 5, 3), dtype))):
        parts = Q.quantize_reference(x, bits, 16, 2)
        lay = Q.layout(x.shape, bits, 16)
        args = (bits, 16, list(x.shape), Q.is_channels_last(x))
        exact = dequantize(*parts, *args, torch.float32, lay.samples, lay.sample_size)
        assert torch.equal(exact, _decode_reference(parts, x, bits, 16)) and exact.stride() == x.stride()
        y = dequantize(*parts, *args, dtype, lay.samples, lay.sample_size)
        # the interpreter stores bf16 by truncation (a GPU rounds to nearest): within one bf16 ulp
        torch.testing.assert_close(y, exact.to(dtype), rtol=2**-7, atol=0)
        assert y.dtype == dtype and y.stride() == x.stride()


def test_codes_are_unbiased():
    """1024 samples holding the same 32 values, each sample its own Philox counters: the mean decode
    is each value within five standard errors (2 bits), in one launch."""
    draws = 1024
    values = randn((1, 32), torch.float32, seed=5)
    x = values.expand(draws, 32).contiguous()
    parts = _launch(x, 2, 32, seed=11)
    decoded = _decode_reference(parts, x, 2, 32).double()
    scale = parts[2][0].double()
    t = (values.double() - parts[1][0]) / scale
    frac = t - t.floor()
    standard_error = scale * (frac * (1 - frac) / draws).sqrt()
    assert ((decoded.mean(0) - values[0]).abs() <= 5 * standard_error[0] + 1e-6).all()
    assert (decoded - x).abs().mean() > 0.15 * scale  # a single decode is far off


def test_the_seed_and_the_stream_choose_the_noise():
    x = randn((2, 3, 5, 7), torch.float32)
    codes = [_launch(x, 2, 16, seed=s, stream=k)[0] for s, k in ((4, 0), (4, 0), (5, 0), (4, 1))]
    assert torch.equal(codes[0], codes[1])
    assert not torch.equal(codes[0], codes[2]) and not torch.equal(codes[0], codes[3])


def test_empty_map():
    codes, mins, scales = _launch(torch.empty(0, 3), 4, 8)
    assert codes.numel() == mins.numel() == scales.numel() == 0


def test_quantized_conv2d_reads_channels_last_in_place(monkeypatch):
    """Under kernels="triton": y is F.conv2d's bit for bit and grad_x and grad_bias are autograd's to
    fp32 rounding, x is read in place, and grad_weight
    (from the kernels' x̂) is close to dense autograd's at 8 bits."""
    x = channels_last(randn((2, 4, 6, 6), torch.float32))
    weight, bias = randn((4, 1, 3, 3), torch.float32, seed=1), randn((4,), torch.float32, seed=2)
    forward = KernelSpy.install(monkeypatch, triton_quantized, "_quantize_kernel")
    backward = KernelSpy.install(monkeypatch, triton_quantized, "_dequantize_kernel")
    ours = [t.clone().requires_grad_() for t in (x, weight, bias)]
    theirs = [t.clone().requires_grad_() for t in (x, weight, bias)]
    with facto_fx.use_kernels("triton"):
        y = facto_fx.ops.quantized_conv2d(*ours, padding=1, groups=4, bits=8, group=32)
        y_ref = F.conv2d(*theirs, padding=1, groups=4)
        grad_y = torch.randn_like(y_ref)
        y.backward(grad_y)
    y_ref.backward(grad_y)
    assert forward.read_in_place(ours[0]) and len(backward.launches) == 1
    assert torch.equal(y, y_ref) and y.stride() == y_ref.stride()
    torch.testing.assert_close(ours[0].grad, theirs[0].grad, rtol=1e-5, atol=1e-5)  # exact: the same sums
    torch.testing.assert_close(ours[2].grad, theirs[2].grad, rtol=1e-5, atol=1e-5)
    assert (ours[1].grad - theirs[1].grad).norm() < 2e-2 * theirs[1].grad.norm()


def test_quantized_mul_under_triton_kernels():
    x = randn((2, 4, 6, 6), torch.float32)
    gate = torch.rand(2, 4, 1, 1)
    ours = [x.clone().requires_grad_(), gate.clone().requires_grad_()]
    theirs = [x.clone().requires_grad_(), gate.clone().requires_grad_()]
    grad_y = randn((2, 4, 6, 6), torch.float32, seed=3)
    with facto_fx.use_kernels("triton"):
        facto_fx.ops.quantized_mul(*ours, bits=8, group=32).backward(grad_y)
    (theirs[0] * theirs[1]).backward(grad_y)
    assert torch.equal(ours[0].grad, theirs[0].grad)  # the gate is kept in full
    assert (ours[1].grad - theirs[1].grad).norm() < 2e-2 * theirs[1].grad.norm()
