"""facto max_pool2d: identical to F.max_pool2d forward and backward, saving a compact argmax code."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from saved_tensors import saved_tensors as _saved

import facto_fx.ops as facto
from facto_fx.ops.bitpack import pack_bits, unpack_codes
from facto_fx.shapes import code_bits


def _distinct(shape, seed=0):
    """Values without ties, so the argmax (and hence the gradient) is unambiguous."""
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    return torch.randperm(n, generator=g).to(torch.float64).view(shape) / n - 0.5


def _pool_out(size, kernel, stride, padding, dilation, ceil_mode):
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    if span < 0:
        return 0
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _windows_touch_input(size, kernel, stride, padding, dilation, ceil_mode):
    """False when some window lies wholly in the padding (possible with dilation): F.max_pool2d then
    returns -inf with an out-of-range index and its own backward corrupts the heap, so torch is no
    reference for the gradient (test_windows_wholly_in_padding has one)."""
    out = _pool_out(size, kernel, stride, padding, dilation, ceil_mode)
    taps = [[o * stride - padding + dilation * t for t in range(kernel)] for o in range(out)]
    return out >= 1 and all(any(0 <= i < size for i in window) for window in taps)


def _check_against_torch(x_base, view, kernel, stride, padding, dilation, ceil_mode, seed=0):
    """Forward equal and gradient equal (through `view`, so non-contiguous inputs are covered)."""
    fx, rx = x_base.clone().requires_grad_(True), x_base.clone().requires_grad_(True)
    y = facto.max_pool2d(view(fx), kernel, stride, padding, dilation, ceil_mode)
    y_ref = F.max_pool2d(view(rx), kernel, stride, padding, dilation, ceil_mode)
    assert torch.equal(y, y_ref)
    grad_y = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(seed), dtype=y_ref.dtype)
    y.backward(grad_y)
    y_ref.backward(grad_y)
    torch.testing.assert_close(fx.grad, rx.grad)


@settings(max_examples=80, deadline=None)
@given(
    batch=st.integers(1, 2),
    channels=st.integers(1, 2),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padded=st.tuples(st.booleans(), st.booleans()),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    ceil_mode=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
# Tiled fast path (kernel == stride, no padding, sizes divisible) and torchvision's 3x3/2 pad 1.
@example(batch=1, channels=2, h=8, w=6, kernel=(2, 2), stride=(2, 2), padded=(False, False), dilation=(1, 1),
         ceil_mode=False, seed=0)
@example(batch=2, channels=1, h=9, w=7, kernel=(3, 3), stride=(2, 2), padded=(True, True), dilation=(1, 1),
         ceil_mode=True, seed=1)
def test_matches_torch(batch, channels, h, w, kernel, stride, padded, dilation, ceil_mode, seed):
    padding = tuple(k // 2 if use else 0 for k, use in zip(kernel, padded, strict=True))
    dims = zip((h, w), kernel, stride, padding, dilation, strict=True)
    assume(all(_windows_touch_input(*dim, ceil_mode) for dim in dims))
    x = _distinct((batch, channels, h, w), seed)
    _check_against_torch(x, lambda t: t, kernel, stride, padding, dilation, ceil_mode, seed)



@pytest.mark.parametrize("kernel", [(2, 2), (3, 3), (2, 3), (1, 3), (3, 1)], ids=str)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_tiled_windows_with_ties_send_the_gradient_to_the_first_maximum(kernel, layout):
    """The tiled path's pairwise max over 3, 4, 6 and 9 taps: values from {0, 1, 2} tie often, and
    the gradient must go where F.max_pool2d's argmax (the first maximum) puts it."""
    g = torch.Generator().manual_seed(sum(kernel))
    x = torch.randint(0, 3, (2, 3, 6 * kernel[0], 4 * kernel[1]), generator=g).to(torch.float64)
    _check_against_torch(x.contiguous(memory_format=layout), lambda t: t, kernel, kernel, 0, 1, False)

@pytest.mark.parametrize(
    ("size", "kernel", "stride", "padding"), [(112, 3, 2, 1), (16, 3, 2, 1), (16, 2, 2, 0), (15, 2, 2, 0)]
)
def test_torchvision_pools_save_at_most_one_bit_per_input(size, kernel, stride, padding):
    """resnet's 3x3/2 pad 1 and vgg's 2x2/2 keep <= 1 bit per input element, and nothing else."""
    x = _distinct((1, 2, size, size)).requires_grad_(True)
    saved = _saved(lambda: facto.max_pool2d(x, kernel, stride, padding))
    assert [t.dtype for t in saved] == [torch.uint8]
    assert saved[0].numel() * 8 <= x.numel()
    _check_against_torch(x.detach(), lambda t: t, kernel, stride, padding, 1, False)


@pytest.mark.parametrize(
    "view",
    [lambda t: t.transpose(-1, -2), lambda t: t[:, 1:, 1:, ::2], lambda t: t.permute(0, 3, 1, 2)],
    ids=["transposed", "sliced", "permuted_to_channels_last"],
)
@pytest.mark.parametrize(("kernel", "stride", "padding"), [(2, 2, 0), (3, 2, 1)])
def test_non_contiguous_input(view, kernel, stride, padding):
    x = _distinct((2, 3, 8, 10), seed=3)
    _check_against_torch(x, view, kernel, stride, padding, 1, False)


@pytest.mark.parametrize("grad_layout", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize(("kernel", "stride", "padding"), [(2, 2, 0), (3, 2, 1)], ids=["tiled", "overlapping"])
def test_channels_last_input(kernel, stride, padding, grad_layout):
    """y stays channels_last like F.max_pool2d's, the codes (the NCHW map's argmaxes) go in memory
    order, and the gradient is torch's whatever the layout of grad_y."""
    x = _distinct((2, 3, 8, 10), seed=7).contiguous(memory_format=torch.channels_last)
    fx, rx = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (code,) = _saved(lambda: facto.max_pool2d(fx, kernel, stride, padding))
    (code_nchw,) = _saved(lambda: facto.max_pool2d(x.contiguous().requires_grad_(True), kernel, stride, padding))
    y, y_ref = facto.max_pool2d(fx, kernel, stride, padding), F.max_pool2d(rx, kernel, stride, padding)
    assert torch.equal(y, y_ref) and y.stride() == y_ref.stride()
    bits = code_bits(kernel * kernel)
    assert torch.equal(code, pack_bits(unpack_codes(code_nchw, bits, y.shape).permute(0, 2, 3, 1), bits))
    grad_y = torch.randn(y.shape, dtype=y.dtype).contiguous(memory_format=grad_layout)
    y.backward(grad_y)
    y_ref.backward(grad_y)
    assert torch.equal(fx.grad, rx.grad)


def _brute_force_gradient(x, grad_y, kernel, stride, padding, dilation):
    """Each output's gradient added at the first largest input its window holds; none for a
    window that holds no input (its -inf output depends on nothing)."""
    grad_x = torch.zeros_like(x)
    h, w = x.shape[-2:]
    for n, c, i, j in torch.cartesian_prod(*(torch.arange(s) for s in grad_y.shape)).tolist():
        taps = [(i * stride[0] - padding[0] + a * dilation[0], j * stride[1] - padding[1] + b * dilation[1])
                for a in range(kernel[0]) for b in range(kernel[1])]
        inside = [(r, q) for r, q in taps if 0 <= r < h and 0 <= q < w]
        if inside:
            r, q = max(inside, key=lambda t: x[n, c, t[0], t[1]].item())
            grad_x[n, c, r, q] += grad_y[n, c, i, j]
    return grad_x


@pytest.mark.parametrize(("shape", "kernel", "stride", "padding", "dilation", "ceil_mode"), [
    ((2, 3, 1, 5), (2, 1), (3, 1), (1, 0), (2, 1), True),  # found by fuzzing: one row, both taps outside
    ((1, 2, 5, 1), (3, 2), (2, 1), (1, 1), (1, 2), False),  # in the width
    ((2, 1, 2, 7), (2, 3), (1, 2), (1, 1), (3, 1), True),  # dilation 3 skips both rows
])
def test_windows_wholly_in_padding(shape, kernel, stride, padding, dilation, ceil_mode):
    """Torch's -inf outputs, and a gradient that leaves such windows out (torch's own writes out of bounds)."""
    dims = zip(shape[2:], kernel, stride, padding, dilation, strict=True)
    assert not all(_windows_touch_input(*dim, ceil_mode) for dim in dims)
    x = _distinct(shape, seed=9).requires_grad_(True)
    y = facto.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
    assert torch.equal(y, F.max_pool2d(x.detach(), kernel, stride, padding, dilation, ceil_mode))
    assert torch.isinf(y).any()
    grad_y = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1))
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    assert torch.equal(grad_x, _brute_force_gradient(x.detach(), grad_y, kernel, stride, padding, dilation))


def test_default_stride_is_kernel():
    x = _distinct((1, 1, 6, 6), seed=4)
    _check_against_torch(x, lambda t: t, 2, None, 0, 1, False)


def test_no_grad_path_matches():
    x = _distinct((1, 2, 7, 7), seed=5)
    assert torch.equal(facto.max_pool2d(x, 3, 2, 1), F.max_pool2d(x, 3, 2, 1))


@pytest.mark.parametrize(
    ("shape", "args"),
    [((2, 2, 8, 8), ([2, 2], [2, 2], [0, 0], [1, 1], False)), ((2, 2, 7, 8), ([3, 2], [2, 1], [1, 0], [1, 2], True))],
    ids=["tiled", "general"],
)
def test_opcheck(shape, args):
    torch.library.opcheck(torch.ops.facto.max_pool2d.default, (_distinct(shape, seed=6).requires_grad_(True), *args))
