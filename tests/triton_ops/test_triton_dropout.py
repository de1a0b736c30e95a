"""Triton dropout: with the same seed it keeps the elements facto::dropout's PyTorch path keeps."""

import pytest
import torch
from kernel_cases import DTYPES, KernelSpy, channels_last, in_layout, noncontiguous, randn, run_op, tolerance

from facto_fx.ops.bitpack import pack_bits, unpack_bits
from facto_fx.ops.dropout import dropout_fwd
from facto_fx.triton_ops import dropout as triton_dropout
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
    """The uniforms are drawn for x as given, so even a copied x keeps the PyTorch path's elements."""
    x = noncontiguous((2, 3, 5), torch.float32)
    torch.manual_seed(0)
    y, mask = dropout_forward(x, 0.5)
    torch.manual_seed(0)
    y_ref, mask_ref = dropout_fwd(x, 0.5)
    assert torch.equal(mask, mask_ref) and torch.equal(y, y_ref)


@pytest.mark.parametrize("grad_layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_input_matches_the_pytorch_path(dtype, grad_layout, monkeypatch):
    """A channels_last map is read in place and, with the same seed, gives the PyTorch path's y
    (layout included), its mask in (N, H, W, C) order and its gradient."""
    x = channels_last(randn((2, 3, 5, 7), dtype))
    grad_y = in_layout(randn(x.shape, dtype, seed=1), grad_layout)
    forward = KernelSpy.install(monkeypatch, triton_dropout, "_dropout_fwd_kernel")
    backward = KernelSpy.install(monkeypatch, triton_dropout, "_dropout_bwd_kernel")
    y, mask, (grad_x,) = run_op(torch.ops.facto.dropout, x, 0.3, kernels="triton", grad_y=grad_y, seed=5)
    assert forward.read_in_place(x)
    assert backward.read_in_place(grad_y) == (grad_layout == "channels_last")  # else read as a copy in x's layout
    y_ref, mask_ref, (grad_ref,) = run_op(torch.ops.facto.dropout, x, 0.3, kernels="torch", grad_y=grad_y, seed=5)
    torch.manual_seed(5)
    keep = torch.rand_like(x, dtype=torch.float32) >= 0.3
    assert torch.equal(mask, mask_ref) and torch.equal(mask, pack_bits(keep.permute(0, 2, 3, 1), 1))
    torch.testing.assert_close(y, y_ref, **tolerance(dtype))
    assert y.stride() == y_ref.stride() == x.stride()
    torch.testing.assert_close(grad_x, grad_ref, **tolerance(dtype))
    torch.testing.assert_close(grad_x, (grad_y.float() * keep / 0.7).to(dtype), **tolerance(dtype))
