"""Triton max-pool: y equals F.max_pool2d, the packed code is byte-identical to facto::max_pool2d's,
and the gathered gradient equals the reference scatter."""

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import DTYPES, KernelSpy, channels_last, distinct, in_layout, randn, run_op, tolerance

from facto_fx.ops.bitpack import pack_bits, unpack_codes
from facto_fx.ops.max_pool import max_pool2d_fwd
from facto_fx.shapes import code_bits
from facto_fx.triton_ops import max_pool as triton_max_pool
from facto_fx.triton_ops.max_pool import max_pool_backward, max_pool_forward

# shape, kernel, stride, padding, dilation, ceil_mode
CASES = [
    ((2, 2, 8, 8), [2, 2], [2, 2], [0, 0], [1, 1], False),  # VGG's pool: tiles exactly
    ((1, 2, 7, 9), [3, 3], [2, 2], [1, 1], [1, 1], False),  # ResNet's stem pool: overlapping windows
    ((1, 2, 7, 9), [3, 3], [2, 2], [1, 1], [1, 1], True),
    ((2, 1, 9, 7), [2, 3], [1, 2], [1, 0], [2, 1], True),  # dilation, asymmetric everything
    ((3, 5, 5), [2, 2], [2, 2], [0, 0], [1, 1], True),  # unbatched, odd size: ceil-mode edge windows
]
# maps with more than one channel (with one, channels_last is contiguous too)
CHANNELS_LAST_CASES = [*CASES[:3], ((1, 3, 9, 7), [2, 3], [1, 2], [1, 0], [2, 1], True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_and_code_match_reference(case, dtype):
    shape, *args = case
    x = distinct(shape, dtype)
    y, code = max_pool_forward(x, *args)
    assert torch.equal(y, F.max_pool2d(x.float(), *args).to(dtype))
    assert torch.equal(code, max_pool2d_fwd(x, *args)[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_matches_reference(case, dtype):
    shape, *args = case
    x = distinct(shape, dtype)
    y, code = max_pool_forward(x, *args)
    grad_y = randn(y.shape, dtype, seed=1)
    leaf = x.clone().requires_grad_(True)
    torch.ops.facto.max_pool2d(leaf, *args)[0].backward(grad_y)
    grad_x = max_pool_backward(grad_y, code, x.shape, *args[:-1])
    torch.testing.assert_close(grad_x, leaf.grad, **tolerance(dtype))


def test_noncontiguous_input():
    x = distinct((2, 2, 6, 7), torch.float32).transpose(-1, -2)
    args = ([2, 2], [2, 2], [0, 0], [1, 1], True)
    y, code = max_pool_forward(x, *args)
    y_ref, code_ref = max_pool2d_fwd(x.contiguous(), *args)
    assert torch.equal(y, y_ref) and torch.equal(code, code_ref)
    grad_y = randn(y.shape, torch.float32).transpose(-1, -2).contiguous().transpose(-1, -2)
    leaf = x.contiguous().requires_grad_(True)
    torch.ops.facto.max_pool2d(leaf, *args)[0].backward(grad_y)
    assert torch.equal(max_pool_backward(grad_y, code, x.shape, *args[:-1]), leaf.grad)


@pytest.mark.parametrize("grad_layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CHANNELS_LAST_CASES, ids=str)
def test_channels_last_input_matches_the_pytorch_path(case, dtype, grad_layout, monkeypatch):
    """A channels_last map is read in place and gives the PyTorch path's y (layout included), its
    codes (the argmaxes of the NCHW map, in (N, H, W, C) order) and its gradient."""
    shape, *args = case
    x = channels_last(distinct(shape, dtype))
    y_nchw, code_nchw = max_pool2d_fwd(x.contiguous(), *args)
    grad_y = in_layout(randn(y_nchw.shape, dtype, seed=1), grad_layout)
    forward = KernelSpy.install(monkeypatch, triton_max_pool, "_max_pool_fwd_kernel")
    backward = KernelSpy.install(monkeypatch, triton_max_pool, "_max_pool_bwd_kernel")
    y, code, (grad_x,) = run_op(torch.ops.facto.max_pool2d, x, *args, kernels="triton", grad_y=grad_y)
    assert forward.read_in_place(x)
    assert backward.read_in_place(grad_y) == (grad_layout == "channels_last")  # else read as a copy in x's layout
    y_ref, code_ref, (grad_ref,) = run_op(torch.ops.facto.max_pool2d, x, *args, kernels="torch", grad_y=grad_y)
    assert torch.equal(y, F.max_pool2d(x.float(), *args).to(dtype))
    assert y.stride() == y_ref.stride() and y.is_contiguous(memory_format=torch.channels_last)
    bits = code_bits(args[0][0] * args[0][1])
    assert torch.equal(code, code_ref)
    assert torch.equal(code, pack_bits(unpack_codes(code_nchw, bits, y.shape).permute(0, 2, 3, 1), bits))
    torch.testing.assert_close(grad_x, grad_ref, **tolerance(dtype))
    assert grad_x.is_contiguous(memory_format=torch.channels_last)  # x's layout
    leaf = x.float().requires_grad_()
    F.max_pool2d(leaf, *args).backward(grad_y.float())
    torch.testing.assert_close(grad_x, leaf.grad.to(dtype), **tolerance(dtype))
