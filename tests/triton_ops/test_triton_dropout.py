"""Triton dropout: with the same seed it keeps the elements facto::dropout's PyTorch path keeps."""

import pytest
import torch
from kernel_cases import DTYPES, noncontiguous, randn, tolerance

from facto_fx.ops.bitpack import unpack_bits
from facto_fx.ops.dropout import dropout_fwd
from facto_fx.triton_ops.dropout import dropout_backward, dropout_forward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "p"), [((1,), 0.5), ((13,), 0.3), ((2, 3, 7, 5), 0.1), ((1, 1027), 0.7)])
def test_forward_matches_reference_with_the_same_seed(shape, p, dtype):
    x = randn(shape, dtype)
    torch.manual_seed(3)
    y, mask = dropout_forward(x, p)
    torch.manual_seed(3)
    y_ref, mask_ref = dropout_fwd(x, p)
    assert torch.equal(mask, mask_ref)
    torch.testing.assert_close(y, y_ref, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_scales_kept_gradients(dtype):
    x, grad_y = randn((3, 37), dtype), randn((3, 37), dtype, seed=1)
    _, mask = dropout_forward(x, 0.4)
    keep = unpack_bits(mask, 1, x.numel()).view(x.shape)
    torch.testing.assert_close(dropout_backward(grad_y, mask, 0.4), grad_y * keep / 0.6, **tolerance(dtype))


def test_noncontiguous_input():
    x = noncontiguous((2, 3, 5), torch.float32)
    torch.manual_seed(0)
    y, mask = dropout_forward(x, 0.5)
    torch.manual_seed(0)
    y_ref, mask_ref = dropout_fwd(x.contiguous(), 0.5)
    assert torch.equal(mask, mask_ref) and torch.equal(y, y_ref)
