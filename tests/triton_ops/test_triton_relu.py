"""Triton relu: y and the packed mask equal torch.relu and pack_bits; backward equals the reference."""

import pytest
import torch
from kernel_cases import DTYPES, KernelSpy, channels_last, in_layout, noncontiguous, randn, run_op

from facto_fx.ops.bitpack import pack_bits, unpack_bits
from facto_fx.triton_ops import relu as triton_relu
from facto_fx.triton_ops.relu import relu_backward, relu_forward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 7), (1, 3, 9, 11), (2, 1030)])
def test_forward_and_mask_match_reference(shape, dtype):
    x = randn(shape, dtype)
    x.view(-1)[::5] = 0  # zeros pass no gradient, as in torch.relu
    y, mask = relu_forward(x)
    assert torch.equal(y, torch.relu(x))
    assert mask.dtype == torch.uint8 and torch.equal(mask, pack_bits(x > 0, 1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_applies_the_mask(dtype):
    x, grad_y = randn((2, 3, 5, 7), dtype), randn((2, 3, 5, 7), dtype, seed=1)
    mask = pack_bits(x > 0, 1)
    assert torch.equal(relu_backward(grad_y, mask), grad_y * unpack_bits(mask, 1, x.numel()).view(x.shape))


def test_noncontiguous_input():
    x = noncontiguous((2, 3, 5, 6), torch.float32)
    y, mask = relu_forward(x)
    assert torch.equal(y, torch.relu(x)) and torch.equal(mask, pack_bits(x > 0, 1))
    grad_y = noncontiguous((2, 3, 5, 6), torch.float32, seed=1)
    assert torch.equal(relu_backward(grad_y, mask), grad_y * (x > 0))


def test_empty_input():
    y, mask = relu_forward(torch.empty(0, 3))
    assert y.shape == (0, 3) and mask.numel() == 0


def test_backward_is_zero_where_masked_even_for_an_infinite_gradient():
    """torch.relu's backward gives 0, not inf·0 = NaN, where the input was not positive."""
    x = torch.tensor([-1.0, 0.0, 2.0, -3.0])
    grad_y = torch.tensor([float("inf"), float("nan"), float("inf"), 1.0])
    reference = x.clone().requires_grad_()
    torch.relu(reference).backward(grad_y)
    assert torch.equal(relu_backward(grad_y, pack_bits(x > 0, 1)), reference.grad)


@pytest.mark.parametrize("grad_layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_input_matches_the_pytorch_path(dtype, grad_layout, monkeypatch):
    """A channels_last map is read in place and gives the PyTorch path's y (layout included), its
    mask in (N, H, W, C) order and its gradient, whatever the layout of grad_y."""
    x = randn((2, 3, 5, 7), dtype)
    x.view(-1)[::5] = 0
    x = channels_last(x)
    grad_y = in_layout(randn(x.shape, dtype, seed=1), grad_layout)
    forward = KernelSpy.install(monkeypatch, triton_relu, "_relu_fwd_kernel")
    backward = KernelSpy.install(monkeypatch, triton_relu, "_relu_bwd_kernel")
    y, mask, (grad_x,) = run_op(torch.ops.facto.relu, x, kernels="triton", grad_y=grad_y)
    assert forward.read_in_place(x)
    assert backward.read_in_place(grad_y) == (grad_layout == "channels_last")  # else read as a copy in x's layout
    y_ref, mask_ref, (grad_ref,) = run_op(torch.ops.facto.relu, x, kernels="torch", grad_y=grad_y)
    assert torch.equal(y, torch.relu(x)) and y.stride() == y_ref.stride() == x.stride()
    assert torch.equal(mask, mask_ref) and torch.equal(mask, pack_bits((x > 0).permute(0, 2, 3, 1), 1))
    assert torch.equal(grad_x, grad_ref) and torch.equal(grad_x, grad_y * (x > 0))
