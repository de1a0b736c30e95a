"""facto::relu — max(x, 0), saving one bit per element (paper §3.2, Figure 4a)."""

from __future__ import annotations

import torch
from torch import Tensor

from facto_fx.ops.bitpack import empty_in_code_order, in_code_order, mask_flags, pack_pieces
from facto_fx.ops.chunks import packed_pieces
from facto_fx.ops.grads import records_gradient, register_autograd
from facto_fx.shapes import is_channels_last
from facto_fx.triton_ops.dispatch import current_mode, use_triton


@torch.library.custom_op("facto::relu", mutates_args=())
def relu_fwd(x: Tensor) -> tuple[Tensor, Tensor]:
    if use_triton(x):
        from facto_fx.triton_ops.relu import relu_forward

        return relu_forward(x)
    return _forward(x)


def _forward(x: Tensor) -> tuple[Tensor, Tensor]:
    """The PyTorch path; on fake tensors, the fake kernel (same dtypes, shapes and strides).

    The mask is packed in x's memory order (ops/bitpack.py), so a channels_last x costs no copy, a
    piece at a time.
    """
    return torch.relu(x), pack_pieces(in_code_order(x, is_channels_last(x)), 1, lambda piece: piece > 0)


relu_fwd.register_fake(_forward)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.channels_last = is_channels_last(inputs[0])  # the order the mask was packed in
    ctx.kernels = current_mode()
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_mask):
    (packed,) = ctx.saved_tensors
    if use_triton(grad_y, ctx.kernels):
        from facto_fx.triton_ops.relu import relu_backward

        return relu_backward(grad_y, packed, ctx.channels_last)
    return grad_input(grad_y, packed, ctx.channels_last)


def grad_input(grad_y: Tensor, packed: Tensor, channels_last: bool) -> Tensor:
    """grad_y where the packed mask is set, else 0, in the mask's layout.

    torch's own relu backward (threshold_backward): 0 where masked, even for an inf gradient (a
    product would give NaN there), and vectorised on the CPU, where torch.where with a bool mask is
    ~15× slower. It runs piece by piece on the CPU (ops/chunks.py), so the mask, unpacked and cast to
    grad_y's dtype, is never a full-size temporary beside the gradient.
    """
    grad_x, out = empty_in_code_order(grad_y, channels_last)
    flat = in_code_order(grad_y, channels_last)
    for codes, elements in packed_pieces(flat.numel(), 8, grad_y):
        mask = mask_flags(packed[codes], elements.stop - elements.start).to(grad_y.dtype)
        torch.ops.aten.threshold_backward.grad_input(flat[elements], mask, 0, grad_input=out[elements])
    return grad_x


register_autograd(relu_fwd, _backward, _setup_context)


def relu(x: Tensor) -> Tensor:
    """ReLU whose backward keeps a bit-packed mask instead of the output."""
    if not records_gradient(x):
        return torch.relu(x)
    return torch.ops.facto.relu(x)[0]
