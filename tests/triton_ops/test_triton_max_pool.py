"""Triton max-pool: y equals F.max_pool2d, the packed code is byte-identical to facto::max_pool2d's,
and the gathered gradient equals the reference scatter."""

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import DTYPES, distinct, randn, tolerance

from facto_fx.ops.max_pool import max_pool2d_fwd
from facto_fx.triton_ops.max_pool import max_pool_backward, max_pool_forward

# shape, kernel, stride, padding, dilation, ceil_mode
CASES = [
    ((2, 2, 8, 8), [2, 2], [2, 2], [0, 0], [1, 1], False),  # VGG's pool: tiles exactly
    ((1, 2, 7, 9), [3, 3], [2, 2], [1, 1], [1, 1], False),  # ResNet's stem pool: overlapping windows
    ((1, 2, 7, 9), [3, 3], [2, 2], [1, 1], [1, 1], True),
    ((2, 1, 9, 7), [2, 3], [1, 2], [1, 0], [2, 1], True),  # dilation, asymmetric everything
    ((3, 5, 5), [2, 2], [2, 2], [0, 0], [1, 1], True),  # unbatched, odd size: ceil-mode edge windows
]


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
