"""compressed_call: forward exact; backward equal to the op's own backward formula evaluated on the
reconstructed feature maps (aten's backward kernels called directly, an independent reference);
parameters, their casts and statistics kept exact; what is saved is the codes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from facto_fx.ops import eb_codec
from facto_fx.ops.error_bound import ErrorBound
from facto_fx.ops.error_bounded import CompressedFunction, compressed_call
from facto_fx.shapes import is_channels_last

EB = 0.02
aten = torch.ops.aten


def rebuilt(t: torch.Tensor) -> torch.Tensor:
    """The value backward sees in place of t: its own round trip through the codec."""
    t = t.detach()
    return eb_codec.decompress(eb_codec.compress(t, EB), t.shape, t.dtype, EB, is_channels_last(t))


def layout(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "channels_last":
        return x.to(memory_format=torch.channels_last)
    if name == "transposed":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    return x


LAYOUTS = ["contiguous", "channels_last", "transposed"]


def leaf(shape, dtype=torch.float32, name="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    return layout(torch.randn(shape, generator=g).to(dtype), name).requires_grad_()


def tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_weight_grad_from_rebuilt_input_input_grad_exact(groups, dtype, name):
    x = leaf((1, 6, 7, 9), dtype, name)
    conv = nn.Conv2d(6, 12, 3, padding=(1, 2), stride=2, groups=groups).to(dtype)
    y = compressed_call(ErrorBound(eb=EB), conv, x)
    assert torch.equal(y, conv(x))
    g = torch.randn_like(y)
    y.backward(g)
    grad_x, grad_w, grad_b = aten.convolution_backward(g, rebuilt(x), conv.weight.detach(), [12], [2, 2], [1, 2],
                                                       [1, 1], False, [0, 0], groups, [True, True, True])
    torch.testing.assert_close(conv.weight.grad, grad_w, **tol(dtype))
    torch.testing.assert_close(conv.bias.grad, grad_b, **tol(dtype))
    exact_x = torch.nn.grad.conv2d_input(x.shape, conv.weight.detach(), g, 2, (1, 2), 1, groups)
    torch.testing.assert_close(x.grad, exact_x, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_under_autocast_keeps_the_weight_cast_exact(dtype):
    x = leaf((5, 33), torch.float32)
    lin = nn.Linear(33, 5)  # rows == out_features: only the weight's origin tells it apart
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y = compressed_call(ErrorBound(eb=EB), lin, x)
        g = torch.randn_like(y)
        y.backward(g)
        x_used = x.to(y.dtype)
    w = lin.weight.detach().to(y.dtype)
    torch.testing.assert_close(x.grad, (g @ w).float(), **tol(dtype))
    torch.testing.assert_close(lin.weight.grad, (g.T @ rebuilt(x_used)).float(), **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fn, backward", [
    (F.silu, lambda g, x, y: aten.silu_backward(g, rebuilt(x))),
    (F.gelu, lambda g, x, y: aten.gelu_backward(g, rebuilt(x))),
    (F.hardswish, lambda g, x, y: aten.hardswish_backward(g, rebuilt(x))),
    (torch.sigmoid, lambda g, x, y: aten.sigmoid_backward(g, rebuilt(y))),  # saves its output
])
def test_activations(fn, backward, dtype):
    x = leaf((2, 3, 5, 7), dtype, "channels_last")
    y = CompressedFunction(fn, ErrorBound(eb=EB))(x)
    assert torch.equal(y, fn(x))
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, backward(g, x, y.detach()), **tol(dtype))


def test_product_of_feature_maps_rebuilds_the_map_keeps_the_small_gate():
    """Squeeze-excite: x (2×4×5×5) times a gate (2×4×1×1); x is rebuilt, the gate (other size) exact."""
    x, s = leaf((2, 4, 5, 5)), leaf((2, 4, 1, 1), seed=1)
    y = CompressedFunction(torch.mul, ErrorBound(eb=EB))(x, s)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * s.detach())
    torch.testing.assert_close(s.grad, (g * rebuilt(x)).sum((2, 3), keepdim=True))


@pytest.mark.parametrize("name", LAYOUTS)
def test_batch_norm_with_batch_statistics(name):
    x = leaf((3, 4, 5, 6), name=name)
    bn = nn.BatchNorm2d(4)
    y = compressed_call(ErrorBound(eb=EB), bn, x)
    mean, var = x.detach().mean((0, 2, 3)), x.detach().var((0, 2, 3), unbiased=False)
    g = torch.randn_like(y)
    y.backward(g)
    invstd = (var + bn.eps).rsqrt()
    grads = aten.native_batch_norm_backward(g, rebuilt(x), bn.weight.detach(), None, None, mean, invstd, True,
                                            bn.eps, [True, True, True])
    for got, want in zip((x.grad, bn.weight.grad, bn.bias.grad), grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_layer_norm_keeps_its_statistics_exact():
    x = leaf((2, 7, 16))
    ln = nn.LayerNorm(16)
    y = compressed_call(ErrorBound(eb=EB), ln, x)
    g = torch.randn_like(y)
    y.backward(g)
    mean = x.detach().mean(-1, keepdim=True)
    rstd = (x.detach().var(-1, unbiased=False, keepdim=True) + ln.eps).rsqrt()
    grads = aten.native_layer_norm_backward(g, rebuilt(x), [16], mean, rstd, ln.weight.detach(), ln.bias.detach(),
                                            [True, True, True])
    for got, want in zip((x.grad, ln.weight.grad, ln.bias.grad), grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_outer_hooks_see_the_codes():
    """A saved-bytes count (or an offload) around the call sees the codes, not the dense map."""
    x = leaf((4, 8, 16, 16))
    x_relu = x.relu()
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        y = CompressedFunction(F.silu, ErrorBound(eb=EB))(x_relu)
    codes = eb_codec.compress(x_relu.detach(), EB)
    assert [t.dtype for t in seen] == [t.dtype for t in codes]
    assert sum(t.nbytes for t in seen) == codes.nbytes < x_relu.nbytes / 2
    y.sum().backward()
    assert x.grad is not None


def test_no_grad_and_meta_are_plain_calls():
    with torch.no_grad():
        assert torch.equal(compressed_call(ErrorBound(eb=EB), F.silu, torch.ones(3)), F.silu(torch.ones(3)))
    assert compressed_call(ErrorBound(eb=EB), F.silu, torch.empty(2, 3, device="meta", requires_grad=True)).is_meta


def test_bad_bound_names_the_argument():
    with pytest.raises(ValueError, match="eb"):
        ErrorBound(eb=0.0)
    with pytest.raises(ValueError, match="exactly one"):
        ErrorBound(eb=0.1, relative=0.1)


def test_relative_bound_of_an_op_that_saves_its_output():
    """sigmoid saves y in (0, 1), whatever x's range: the bound is relative to what is saved."""
    x = (10 * torch.randn(4, 64)).requires_grad_()
    bound = ErrorBound(relative=0.02)
    y = compressed_call(bound, torch.sigmoid, x)
    assert bound.eb == pytest.approx(0.02 * (y.max() - y.min()).item())
    g = torch.randn_like(y)
    y.backward(g)
    saved = eb_codec.decompress(eb_codec.compress(y.detach(), bound.eb), y.shape, y.dtype, bound.eb)
    torch.testing.assert_close(x.grad, aten.sigmoid_backward(g, saved))


@pytest.mark.parametrize("modify", ["weight", "output"])
def test_in_place_change_before_backward_is_an_error(modify):
    """As without hooks: autograd skips its version check for tensors saved through hooks."""
    x = leaf((4, 16))
    if modify == "weight":
        lin = nn.Linear(16, 8)
        y = compressed_call(ErrorBound(eb=EB), lin, x)
        with torch.no_grad():
            lin.weight.mul_(0)
    else:
        y = compressed_call(ErrorBound(eb=1e-30), torch.sigmoid, x)  # kept exact: codes would be larger
        y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_in_place_activation_modules_still_train():
    x = leaf((2, 3, 5, 7))
    for module in (nn.Hardswish(inplace=True), nn.ReLU6(inplace=True), nn.LeakyReLU(inplace=True)):
        h = x * 1.0
        y = compressed_call(ErrorBound(eb=1e-6), module, h)
        g = torch.randn_like(y)
        (grad,) = torch.autograd.grad(y, x, g)
        dense_x = x.detach().clone().requires_grad_()
        (dense,) = torch.autograd.grad(type(module)()(dense_x * 1.0), dense_x, g)
        torch.testing.assert_close(grad, dense)


def test_a_parametrized_weight_is_not_a_feature_map():
    """weight_norm computes W in forward from g and v: the same size as x here, never compressed."""
    lin = nn.utils.parametrizations.weight_norm(nn.Linear(64, 64))
    x = leaf((64, 64))
    y = compressed_call(ErrorBound(eb=0.5), lin, x)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ lin.weight.detach())
