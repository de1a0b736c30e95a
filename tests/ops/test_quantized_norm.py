"""facto::quantized_layer_norm / quantized_group_norm against torch's own norms (dense autograd)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from facto_fx.ops.quantized import quantized_nbytes
from facto_fx.ops.quantized_norm import quantized_group_norm, quantized_layer_norm


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _map(shape, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":
        return (torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * 3 + 1).to(dtype)[..., ::2]
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


# (name, ours, torch's): layer norm over channels as convnext's blocks run it (NHWC), layer norm
# over the last two dims, group norm in 4 groups.
NORMS = [
    ("layer_norm_nhwc", lambda x, w, b, bits: quantized_layer_norm(x.permute(0, 2, 3, 1), [12], w, b, 1e-6, bits),
     lambda x, w, b: F.layer_norm(x.permute(0, 2, 3, 1), [12], w, b, 1e-6), (12,)),
    ("layer_norm_2d", lambda x, w, b, bits: quantized_layer_norm(x, [7, 9], w, b, 1e-5, bits),
     lambda x, w, b: F.layer_norm(x, [7, 9], w, b, 1e-5), (7, 9)),
    ("group_norm", lambda x, w, b, bits: quantized_group_norm(x, 4, w, b, 1e-5, bits),
     lambda x, w, b: F.group_norm(x, 4, w, b, 1e-5), (12,)),
]


def _run(fn, x, w, b, grad):
    x = x.detach().requires_grad_()
    w = None if w is None else w.detach().requires_grad_()
    b = None if b is None else b.detach().requires_grad_()
    y = fn(x, w, b)
    y.backward(grad)
    return y, x.grad, None if w is None else w.grad, None if b is None else b.grad


@pytest.mark.parametrize(("name", "ours", "theirs", "param_shape"), NORMS, ids=[n[0] for n in NORMS])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_is_torchs_and_8_bit_gradients_are_dense_autograds(name, ours, theirs, param_shape, layout, dtype,
                                                                   batch):
    """y is torch's, bit for bit, dtype and strides; at 8 bits grad_x and grad_γ are within 3 % of
    dense autograd in float64 and grad_β (which needs no x̂) within 1e-5, with torch's strides."""
    torch.manual_seed(0)
    x = _map((batch, 12, 7, 9), dtype, layout)
    w, b = torch.randn(param_shape), torch.randn(param_shape)
    grad = torch.randn_like(theirs(x, w, b))
    y, gx, gw, gb = _run(lambda x, w, b: ours(x, w, b, 8), x, w, b, grad)
    y_torch, gx_torch, _, _ = _run(theirs, x, w, b, grad)
    _, gx_ref, gw_ref, gb_ref = _run(theirs, x.double(), w.double(), b.double(), grad.double())
    assert torch.equal(y, y_torch) and y.stride() == y_torch.stride()
    assert gx.dtype == x.dtype and gx.stride() == gx_torch.stride()
    assert _rel(gx, gx_ref) < 3e-2 and _rel(gw, gw_ref) < 3e-2
    assert _rel(gb, gb_ref) < 1e-5


@pytest.mark.parametrize(("name", "ours", "theirs", "param_shape"), NORMS, ids=[n[0] for n in NORMS])
def test_without_affine_parameters(name, ours, theirs, param_shape):
    x = _map((2, 12, 7, 9), torch.float32, "contiguous")
    grad = torch.randn_like(theirs(x, None, None))
    y, gx, _, _ = _run(lambda x, w, b: ours(x, w, b, 8), x, None, None, grad)
    y_ref, gx_ref, _, _ = _run(theirs, x, None, None, grad)
    assert torch.equal(y, y_ref) and _rel(gx, gx_ref) < 3e-2


@pytest.mark.parametrize(("name", "ours", "theirs", "param_shape"), NORMS, ids=[n[0] for n in NORMS])
def test_two_bit_gradients_are_unbiased(name, ours, theirs, param_shape):
    """grad_γ is linear in x̂, so the mean of 64 draws at 2 bits is much closer to dense autograd's than
    one draw (1/8 of the error for independent draws; asked: under 1/3)."""
    x = _map((2, 12, 7, 9), torch.float32, "contiguous", seed=1)
    w, b = torch.randn(param_shape), torch.randn(param_shape)
    grad = torch.randn_like(theirs(x, w, b))
    gw_ref = _run(theirs, x, w, b, grad)[2]
    torch.manual_seed(0)
    draws = [_run(lambda x, w, b: ours(x, w, b, 2), x, w, b, grad)[2] for _ in range(64)]
    single = sum(_rel(d, gw_ref) for d in draws[:8]) / 8
    assert _rel(torch.stack(draws).mean(0), gw_ref) < single / 3


def test_saved_bytes_are_codes_statistics_and_one_scale_per_row():
    """What the op keeps, counted by autograd's saved-tensor hooks, against the count by hand: x̂ in
    4 bits with 8 bytes per 256-element group, 1/σ per row (fp32), and the parameters."""
    x = torch.randn(4, 56, 56, 96, requires_grad=True)  # a convnext_tiny stage-1 map, NHWC
    w, b = torch.ones(96, requires_grad=True), torch.zeros(96, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        quantized_layer_norm(x, [96], w, b, 1e-6, 4)
    activation = sum(t.numel() * t.element_size() for t in saved if t is not w and t is not b)
    expected = quantized_nbytes(x.shape, 4) + 4 * 56 * 56 * 4
    assert activation == expected
    assert activation < x.numel() * 4 / 6.5  # vanilla keeps x (and μ, 1/σ): 1/7 of it here


def test_no_gradient_is_the_plain_function():
    x = torch.randn(2, 12, 5, 5)
    assert torch.equal(quantized_group_norm(x, 3, bits=2), F.group_norm(x, 3))
    assert torch.equal(quantized_layer_norm(x, 5, bits=2), F.layer_norm(x, [5]))


def test_groups_must_divide_the_channels():
    x = torch.randn(2, 10, 3, 3, requires_grad=True)
    with pytest.raises(ValueError, match="10 channels in 4 groups"):
        quantized_group_norm(x, 4)


def test_bits_are_checked():
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantized_layer_norm(x, [3], bits=3)
