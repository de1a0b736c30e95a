"""facto's quantized store (quantize_map / dequantize_map) and the ops whose backward keeps it:
every element decodes within one step of its group, unbiased over the noise; quantized_conv2d is
F.conv2d forward, grad_x and grad_bias exactly, grad_weight from the decoded x; quantized_mul is
a · b with each gradient from the other's stored form."""

import math

import pytest
import torch
import torch.nn.functional as F
from leaves import leaf
from saved_tensors import saved_tensors as _saved
from torch._subclasses.fake_tensor import FakeTensorMode

import facto_fx.ops as facto
from facto_fx.ops import quantized as Q
from facto_fx.ops.bitpack import pack_bits
from facto_fx.shapes import pair

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10, torch.float64: 2.0**-52}


def _seed(value: int = 0) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64)


def _map(shape, dtype=torch.float32, layout="contiguous", seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":  # every other column of a wider map: neither contiguous nor channels_last
        return torch.randn(*shape[:-1], 2 * shape[-1], generator=g).to(dtype)[..., ::2]
    x = torch.randn(shape, generator=g).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _per_element(m: Q.QuantizedMap, stats: torch.Tensor) -> torch.Tensor:
    """A per-group statistic repeated over its group's elements, in memory order."""
    lay = Q.layout(m.shape, m.bits, m.group)
    rows = stats.view(lay.samples, lay.groups_per_sample).repeat_interleave(m.group, dim=1)
    return rows[:, : lay.sample_size].reshape(-1)


def _decode(m: Q.QuantizedMap, dtype: torch.dtype) -> torch.Tensor:
    return m._replace(dtype=dtype).decode()


ROUND_TRIP_SHAPES = [
    ((2, 3, 5, 7), 16),  # 105 elements a sample: 6 whole groups and one of 9
    ((1, 5, 3, 3), 8),  # batch 1, 45 elements: an odd sample size
    ((3, 40), 256),  # one short group a sample
    ((37,), 8),  # a 1-d tensor: one sample
]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", Q.QUANTIZED_BITS)
def test_every_element_decodes_within_one_step_of_its_group(bits, dtype, layout):
    for shape, group in ROUND_TRIP_SHAPES:
        if layout != "contiguous" and len(shape) != 4:
            continue
        x = _map(shape, dtype, layout)
        m = Q.quantize(x, bits, group, _seed(1))
        lay = Q.layout(shape, bits, group)
        assert m.codes.dtype == torch.uint8 and m.codes.numel() == lay.samples * math.ceil(lay.sample_size * bits / 8)
        assert m.mins.dtype == m.scales.dtype == torch.float32 and m.mins.numel() == lay.groups
        assert m.nbytes == Q.quantized_nbytes(shape, bits, group)
        flat = Q.memory_order(x.contiguous() if layout == "strided" else x).double()
        scale = _per_element(m, m.scales).double()
        exact = Q.memory_order(_decode(m, torch.float32)).double()  # min + q · scale in fp32
        assert ((exact - flat).abs() <= scale * (1 + 1e-6) + 1e-6 * flat.abs()).all()
        y = m.decode()  # rounded once to x's dtype: within that rounding more
        assert y.dtype == dtype and y.shape == x.shape
        assert y.stride() == (x.contiguous() if layout == "strided" else x).stride()
        decoded = Q.memory_order(y).double()
        assert ((decoded - flat).abs() <= scale * (1 + 1e-6) + EPS[dtype] * (flat.abs() + decoded.abs())).all()


def test_group_statistics_are_the_groups_min_and_range():
    x = _map((2, 3, 4, 5), torch.bfloat16, "channels_last")
    m = Q.quantize(x, 4, 8, _seed())
    rows = Q.memory_order(x).view(2, 60).float()
    groups = torch.stack([torch.stack([r[i:i + 8].min() for i in range(0, 60, 8)]) for r in rows])
    highs = torch.stack([torch.stack([r[i:i + 8].max() for i in range(0, 60, 8)]) for r in rows])
    assert torch.equal(m.mins, groups.reshape(-1))
    assert torch.equal(m.scales, (highs - groups).reshape(-1) * (1.0 / 15))


def test_constant_groups_decode_exactly():
    x = torch.randn(2, 48)
    x[0, :16] = 0.0
    x[1, 16:32] = -1.25
    x[1, 32:] = 3.0  # the short last group of a sample
    x = x.to(torch.bfloat16)
    m = Q.quantize(x, 2, 16, _seed(3))
    assert (m.scales.view(2, 3)[[0, 1, 1], [0, 1, 2]] == 0).all()
    y = m.decode()
    assert torch.equal(y[0, :16], x[0, :16]) and torch.equal(y[1, 16:], x[1, 16:])


@pytest.mark.parametrize("bits", Q.QUANTIZED_BITS)
def test_values_on_the_levels_are_coded_exactly_in_memory_order(bits):
    """Integers 0 .. 2^b − 1 with both ends in every group have min 0 and scale 1: their codes are
    the values, whatever the noise, packed in memory order (channels_last: N, H, W, C) as
    ops/bitpack.pack_bits packs them."""
    levels = (1 << bits) - 1
    g = torch.Generator().manual_seed(bits)
    x = torch.randint(0, levels + 1, (2, 8, 3, 4), generator=g).float()  # 96 elements a sample, 6 groups
    nhwc = x.permute(0, 2, 3, 1).reshape(2, -1)
    nhwc[:, ::16], nhwc[:, 1::16] = 0.0, float(levels)
    x_cl = nhwc.view(2, 3, 4, 8).permute(0, 3, 1, 2)  # channels_last, those values in memory order
    m = Q.quantize(x_cl, bits, 16, _seed(4))
    assert torch.equal(m.mins, torch.zeros(12)) and torch.equal(m.scales, torch.ones(12))
    assert torch.equal(m.codes, pack_bits(nhwc.to(torch.uint8), bits))
    assert torch.equal(m.decode(), x_cl) and m.decode().stride() == x_cl.stride()


def test_each_samples_codes_start_on_a_byte():
    """7 elements a sample at 2 bits: two bytes each, the last padded with zero codes."""
    x = torch.tensor([[0.0, 3, 1, 2, 3, 0, 1], [3, 3, 0, 0, 2, 1, 0]])
    m = Q.quantize(x, 2, 8, _seed())
    assert torch.equal(m.codes, torch.cat([pack_bits(torch.tensor([0, 3, 1, 2, 3, 0, 1, 0]), 2),
                                           pack_bits(torch.tensor([3, 3, 0, 0, 2, 1, 0, 0]), 2)]))
    assert torch.equal(m.decode(), x)


def test_the_same_seed_gives_the_same_codes_and_others_differ():
    x = _map((2, 3, 5, 7))
    codes = [Q.quantize(x, 2, 16, _seed(s)).codes for s in (5, 5, 6)]
    assert torch.equal(codes[0], codes[1]) and not torch.equal(codes[0], codes[2])
    torch.manual_seed(0)
    first = Q.quantize(x, 2, 16).codes  # the seed drawn from torch's generator follows manual_seed
    torch.manual_seed(0)
    assert torch.equal(Q.quantize(x, 2, 16).codes, first)


def test_decoding_is_unbiased():
    """The mean of 2000 decodes (2 bits, one seed each) is x within five standard errors, while a
    single decode is off by a quarter step on average."""
    x = _map((2, 37), seed=2)
    draws = 2000
    total = torch.zeros_like(x, dtype=torch.float64)
    for s in range(draws):
        codes, mins, scales = Q.quantize_reference(x, 2, 16, s)
        total += Q.dequantize_reference(codes, mins, scales, 2, 16, x.shape, False, torch.float32)
    m = Q.quantize(x, 2, 16, _seed())
    scale = _per_element(m, m.scales).view(x.shape).double()
    t = (x.double() - _per_element(m, m.mins).view(x.shape)) / scale
    frac = t - t.floor()
    standard_error = scale * (frac * (1 - frac) / draws).sqrt()
    error = (total / draws - x).abs()
    assert (error <= 5 * standard_error + 1e-6).all()
    assert (m.decode() - x).abs().mean() > 0.15 * scale.mean()


def test_bits_and_group_are_checked():
    x = torch.randn(2, 8)
    for bits in (1, 3, 16, True):
        with pytest.raises(ValueError, match="bits"):
            Q.quantize(x, bits)
    for group in (0, 12, 8192, 8.0):
        with pytest.raises(ValueError, match="group"):
            facto.quantized_mul(x.requires_grad_(), x, group=group)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fakes_agree_with_the_real_maps(dtype, layout):
    x = _map((2, 3, 5, 7), dtype, layout)
    real = torch.ops.facto.quantize_map(x, 4, 16, _seed())
    decode_args = (4, 16, list(x.shape), layout == "channels_last", dtype)
    decoded = torch.ops.facto.dequantize_map(*real, *decode_args)
    with FakeTensorMode() as mode:
        fake = torch.ops.facto.quantize_map(mode.from_tensor(x), 4, 16, mode.from_tensor(_seed()))
        fake_decoded = torch.ops.facto.dequantize_map(*fake, *decode_args)
    for r, f in zip((*real, decoded), (*fake, fake_decoded), strict=True):
        assert (r.dtype, r.shape, r.stride()) == (f.dtype, f.shape, f.stride())
    assert decoded.stride() == x.stride()


def test_opcheck_of_the_storage_ops():
    x = _map((2, 3, 5, 7), layout="channels_last")
    torch.library.opcheck(torch.ops.facto.quantize_map.default, (x, 2, 16, _seed()))
    parts = torch.ops.facto.quantize_map(x, 2, 16, _seed())
    torch.library.opcheck(torch.ops.facto.dequantize_map.default, (*parts, 2, 16, [2, 3, 5, 7], True, torch.bfloat16))


# -- quantized_conv2d ---------------------------------------------------------------------------------

CONVS = {  # (x shape, weight shape, stride, padding, dilation, groups)
    "depthwise": ((2, 6, 9, 9), (6, 1, 3, 3), 1, 1, 1, 6),
    "depthwise-stride2-dilated": ((2, 6, 10, 9), (6, 1, 3, 3), 2, 2, 2, 6),
    "grouped": ((1, 6, 7, 8), (4, 3, 3, 3), (2, 1), (1, 0), 1, 2),
    "dense": ((2, 3, 6, 6), (5, 3, 3, 3), 1, 1, 1, 1),
}


def _conv_case(name, layout="contiguous", seed=0):
    x_shape, w_shape, stride, padding, dilation, groups = CONVS[name]
    g = torch.Generator().manual_seed(seed)
    x = _map(x_shape, layout=layout, seed=seed)
    weight = torch.randn(w_shape, generator=g)
    bias = torch.randn(w_shape[0], generator=g)
    return x, weight, bias, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def _grads(conv, x, weight, bias, grad_y, kwargs, **extra):
    leaves = [leaf(x), leaf(weight), leaf(bias)]
    y = conv(*leaves, **kwargs, **extra)
    y.backward(grad_y)
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", list(CONVS))
def test_conv_forward_is_torchs_and_grad_x_and_grad_bias_are_exact(name, layout):
    """y is F.conv2d's bit for bit; grad_x (in torch's layout) and grad_bias are autograd's in
    float64 to fp32 rounding (no approximation: the same sums in another order)."""
    x, weight, bias, kwargs = _conv_case(name, layout)
    reference = [leaf(x), leaf(weight), leaf(bias)]
    y_ref = F.conv2d(*reference, **kwargs)
    grad_y = torch.randn_like(y_ref)
    y_ref.backward(grad_y)
    exact = [leaf(t.double()) for t in (x, weight, bias)]
    F.conv2d(*exact, **kwargs).backward(grad_y.double())
    y, (gx, gw, gb) = _grads(facto.quantized_conv2d, x, weight, bias, grad_y, kwargs, bits=8, group=32)
    assert torch.equal(y, y_ref) and y.stride() == y_ref.stride()
    torch.testing.assert_close(gx.double(), exact[0].grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb.double(), exact[2].grad, rtol=1e-5, atol=1e-5)
    assert gx.dtype == gb.dtype == torch.float32 and gx.stride() == reference[0].grad.stride()
    gw_ref = reference[1].grad
    assert (gw - gw_ref).norm() < 2e-2 * gw_ref.norm()  # 8 bits: x̂ is ~1% off x (N(0, 1) data)


def test_conv_grad_x_without_a_weight_gradient_is_torchs():
    x, weight, bias, kwargs = _conv_case("depthwise")
    xs = leaf(x), leaf(x)
    y_ref = F.conv2d(xs[0], weight, bias, **kwargs)
    grad_y = torch.randn_like(y_ref)
    y_ref.backward(grad_y)
    facto.quantized_conv2d(xs[1], weight, bias, **kwargs).backward(grad_y)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-5, atol=1e-5)


def test_conv_weight_gradient_error_shrinks_with_bits_and_is_unbiased():
    """Depthwise, N(0, 1) data, groups of 256: one draw's relative error follows the step, range /
    (2^b − 1) (≈0.72, 0.13, 0.008 at 2, 4, 8 bits); the mean of 32 draws at 2 bits is about 1/√32
    as far, as unbiased draws are."""
    x, weight, bias, kwargs = _conv_case("depthwise")
    x = torch.randn(2, 6, 16, 16)
    ref = leaf(weight)
    y = F.conv2d(x, ref, None, **kwargs)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    errors = {}
    draws = {2: 32, 4: 2, 8: 2}
    for bits, count in draws.items():
        grads = []
        for s in range(count):
            torch.manual_seed(s)
            w = leaf(weight)
            facto.quantized_conv2d(x.requires_grad_(), w, None, bits=bits, **kwargs).backward(grad_y)
            grads.append(w.grad)
        errors[bits] = sum((g - ref.grad).norm() / ref.grad.norm() for g in grads) / count
        if bits == 2:
            mean_error = (torch.stack(grads).mean(0) - ref.grad).norm() / ref.grad.norm()
            assert mean_error < errors[2] / 3, (mean_error, errors[2])
    assert errors[2] > 3 * errors[4] > 9 * errors[8] and errors[8] < 1.5e-2, errors


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_conv_weight_gradient_over_many_pieces_is_that_of_the_decoded_map(layout, dtype):
    """A batch the CPU backward decodes in several pieces of samples: grad_weight is the weight
    gradient of the whole decoded map (its codes read back from what autograd saved, decoded in
    fp32, as the CPU backward decodes them for every dtype), computed in float64 by torch.nn.grad."""
    x = _map((6, 12, 128, 130), dtype, layout, seed=3)  # 1.2M elements: pieces of 5 samples and 1
    weight = torch.randn(12, 1, 3, 3, generator=torch.Generator().manual_seed(3))
    xl, wl, outputs = leaf(x), leaf(weight), []
    saved = _saved(lambda: outputs.append(facto.quantized_conv2d(xl, wl, None, 2, 1, 1, 12, bits=4, group=64)))
    grad_y = torch.randn(outputs[0].shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    outputs[0].backward(grad_y)
    x_hat = Q.QuantizedMap(*saved[:3], 4, 64, tuple(x.shape), layout == "channels_last", torch.float32).decode()
    expected = torch.nn.grad.conv2d_weight(x_hat.double(), weight.shape, grad_y.double(), 2, 1, 1, 12)
    torch.testing.assert_close(wl.grad.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_conv_backward_holds_the_input_gradient_and_little_else():
    """The CPU backward of a wide depthwise map (the first stage of a MobileNet): its peak, from the
    allocator's events, is at most 2.3 times the input's size (the gradient and oneDNN's reordered
    copy of it; a piece of x̂), where aten's backward on the decoded map held 3.25 times."""
    from facto_fx.memory import peak_step_bytes

    x = leaf(_map((4, 64, 80, 80), seed=5))
    weight = leaf(torch.randn(64, 1, 3, 3))
    y = facto.quantized_conv2d(x, weight, None, 2, 1, 1, 64)
    grad_y = torch.randn_like(y)
    peak = peak_step_bytes(lambda: torch.autograd.grad(y, (x, weight), grad_y))
    assert peak <= 2.3 * x.numel() * 4


def test_conv_saves_the_codes_and_the_weight_only():
    x, weight, bias, kwargs = _conv_case("depthwise", "channels_last")
    xl, wl, bl = leaf(x), leaf(weight), leaf(bias)
    saved = _saved(lambda: facto.quantized_conv2d(xl, wl, bl, bits=4, group=32, **kwargs))
    assert [t.dtype for t in saved] == [torch.uint8, torch.float32, torch.float32, torch.float32]
    assert saved[3] is wl
    codes_bytes = sum(t.numel() * t.element_size() for t in saved[:3])
    assert codes_bytes == Q.quantized_nbytes(x.shape, 4, 32) < x.numel() * x.element_size() / 4
    assert saved[0].numel() == x.numel() // 2  # 4 bits an element, nothing of x's size in full


def test_conv_without_a_gradient_is_f_conv2d():
    x, weight, bias, kwargs = _conv_case("depthwise")
    saved = _saved(lambda: facto.quantized_conv2d(x, weight, bias, **kwargs))
    assert saved == [] and torch.equal(facto.quantized_conv2d(x, weight, bias, **kwargs),
                                       F.conv2d(x, weight, bias, **kwargs))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv_under_autocast_casts_as_f_conv2d(layout):
    x, weight, bias, kwargs = _conv_case("depthwise", layout)
    ours, theirs = [leaf(x), leaf(weight), leaf(bias)], [leaf(x), leaf(weight), leaf(bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = facto.quantized_conv2d(*ours, **kwargs)
        y_ref = F.conv2d(*theirs, **kwargs)
        args = (ours[0], ours[1], ours[2], *(pair(kwargs[k]) for k in ("stride", "padding", "dilation")),
                kwargs["groups"], 4, 256, _seed())
        real = torch.ops.facto.quantized_conv2d(*args)
        with FakeTensorMode() as mode:
            fake = torch.ops.facto.quantized_conv2d(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                      for a in args))
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref) and y.stride() == y_ref.stride()
    assert [(r.dtype, r.shape, r.stride()) for r in real] == [(f.dtype, f.shape, f.stride()) for f in fake]
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    y_ref.backward(grad_y)
    assert [t.grad.dtype for t in ours] == [torch.float32] * 3
    for got, expected in ((ours[0].grad, theirs[0].grad), (ours[2].grad, theirs[2].grad)):  # bf16 sums
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    assert (ours[1].grad - theirs[1].grad).norm() < 0.3 * theirs[1].grad.norm()  # 4 bits


def test_torch_compile_fullgraph_matches_eager():
    """aot_eager: the fake and the backward formula (its decoding included) are traced."""
    x, weight, bias, kwargs = _conv_case("depthwise-stride2-dilated", "channels_last")

    def step(x, weight, bias):
        return facto.quantized_conv2d(x, weight, bias, bits=4, group=64, **kwargs).square().sum()

    eager, compiled = [leaf(x), leaf(weight), leaf(bias)], [leaf(x), leaf(weight), leaf(bias)]
    torch.manual_seed(0)
    loss = step(*eager)
    loss.backward()
    torch.manual_seed(0)
    compiled_loss = torch.compile(step, backend="aot_eager", fullgraph=True)(*compiled)
    compiled_loss.backward()
    assert torch.equal(compiled_loss, loss)
    for e, c in zip(eager, compiled, strict=True):
        assert torch.equal(c.grad, e.grad)  # the same seed: the same codes, the same grad_weight


# -- quantized_mul ------------------------------------------------------------------------------------


def _mul_grads(mul, a, b, grad_y, **extra):
    la, lb = leaf(a), leaf(b)
    y = mul(la, lb, **extra)
    y.backward(grad_y)
    return y.detach(), la.grad, lb.grad


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_mul_with_a_gate_keeps_the_gate_in_full(layout):
    """x · gate (squeeze-excite): forward and grad_x are torch's exactly (the (N, C, 1, 1) gate, 6
    elements a sample, is saved as it is), grad_gate comes from x̂, close at 8 bits."""
    x = _map((2, 6, 5, 7), layout=layout)
    gate = torch.rand(2, 6, 1, 1)
    y_ref, gx_ref, gg_ref = _mul_grads(torch.mul, x, gate, grad_y := torch.randn(2, 6, 5, 7))
    y, gx, gg = _mul_grads(facto.quantized_mul, x, gate, grad_y, bits=8, group=32)
    assert torch.equal(y, y_ref) and y.stride() == y_ref.stride()
    assert torch.equal(gx, gx_ref) and gg.shape == gate.shape
    assert (gg - gg_ref).norm() < 2e-2 * gg_ref.norm()


def test_mul_of_two_maps_is_unbiased_and_close_at_8_bits():
    a, b = _map((2, 4, 6, 6), seed=1), _map((2, 4, 6, 6), seed=2)
    grad_y = torch.randn(2, 4, 6, 6)
    _, ga_ref, gb_ref = _mul_grads(torch.mul, a, b, grad_y)
    _, ga, gb = _mul_grads(facto.quantized_mul, a, b, grad_y, bits=8, group=32)
    assert (ga - ga_ref).norm() < 2e-2 * ga_ref.norm() and (gb - gb_ref).norm() < 2e-2 * gb_ref.norm()
    draws = [_mul_grads(facto.quantized_mul, a, b, grad_y, bits=2, group=32) for _ in range(32)]
    for i, ref in ((1, ga_ref), (2, gb_ref)):
        single = sum((d[i] - ref).norm() for d in draws) / len(draws)
        assert (torch.stack([d[i] for d in draws]).mean(0) - ref).norm() < single / 3


def test_mul_broadcasts_and_reduces_its_gradients():
    """a (2, 1, 6, 6) against b (1, 4, 6, 6): both quantized, the gradients summed to each shape."""
    a, b = _map((2, 1, 6, 6), seed=1), _map((1, 4, 6, 6), seed=2)
    grad_y = torch.randn(2, 4, 6, 6)
    y_ref, ga_ref, gb_ref = _mul_grads(torch.mul, a, b, grad_y)
    y, ga, gb = _mul_grads(facto.quantized_mul, a, b, grad_y, bits=8, group=32)
    assert torch.equal(y, y_ref) and ga.shape == a.shape and gb.shape == b.shape
    torch.testing.assert_close(ga, ga_ref, rtol=0.05, atol=0.05)
    torch.testing.assert_close(gb, gb_ref, rtol=0.05, atol=0.05)


def test_mul_keeps_only_what_a_gradient_needs():
    x, gate = _map((2, 6, 5, 7)), torch.rand(2, 6, 1, 1)
    lx, lg = leaf(x), leaf(gate)
    saved = _saved(lambda: facto.quantized_mul(lx, lg, bits=4, group=32))
    kept = [t for t in saved if t is not None and t.numel()]
    assert kept[-1] is lg  # the gate, in full
    assert sum(t.numel() * t.element_size() for t in kept[:-1]) == Q.quantized_nbytes(x.shape, 4, 32)
    saved = _saved(lambda: facto.quantized_mul(lx, gate, bits=4, group=32))  # no grad_gate: x not kept
    assert [t for t in saved if t is not None and t.numel()] == [gate]
    assert _saved(lambda: facto.quantized_mul(x, gate)) == []


def test_mul_fakes_agree_under_autocast():
    a, b = _map((2, 4, 6, 6), layout="channels_last"), torch.rand(2, 4, 1, 1)
    args = (a, b, 4, 32, _seed(), True, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        real = torch.ops.facto.quantized_mul(*args)
        with FakeTensorMode() as mode:
            fake = torch.ops.facto.quantized_mul(*(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t
                                                   for t in args))
    assert [(r.dtype, r.shape, r.stride()) for r in real] == [(f.dtype, f.shape, f.stride()) for f in fake]
    assert real[0].dtype == torch.float32 and real[4].numel() == 0  # no cast; the gate is not quantized


def test_conv_on_an_empty_batch_gives_torchs_empty_and_zero_gradients():
    x, weight = leaf(torch.randn(0, 4, 6, 6)), leaf(torch.randn(4, 1, 3, 3))
    x_ref, weight_ref = leaf(x.detach()), leaf(weight.detach())
    facto.quantized_conv2d(x, weight, None, 1, 1, 1, 4).sum().backward()
    F.conv2d(x_ref, weight_ref, None, 1, 1, 1, 4).sum().backward()
    assert x.grad.shape == x_ref.grad.shape and torch.equal(weight.grad, weight_ref.grad)
