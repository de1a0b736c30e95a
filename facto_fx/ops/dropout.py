"""facto::dropout — inverted dropout whose backward keeps a bit-packed keep-mask."""

from __future__ import annotations

import torch
from torch import Tensor

from facto_fx.ops.bitpack import pack_bits, unpack_codes
from facto_fx.ops.grads import records_gradient, register_autograd
from facto_fx.shapes import is_channels_last
from facto_fx.triton_ops.dispatch import current_mode, use_triton


@torch.library.custom_op("facto::dropout", mutates_args=())
def dropout_fwd(x: Tensor, p: float) -> tuple[Tensor, Tensor]:
    if use_triton(x):
        from facto_fx.triton_ops.dropout import dropout_forward

        return dropout_forward(x, p)
    return _forward(x, p)


def _forward(x: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """The PyTorch path; on fake tensors, the fake kernel. Uniforms are drawn in fp32: in 16 bits
    their coarse grid biases the keep rate. The mask is packed in x's memory order (ops/bitpack.py)."""
    keep = torch.rand_like(x, dtype=torch.float32) >= p
    return x * keep / (1.0 - p), pack_bits(keep, 1, is_channels_last(x))


dropout_fwd.register_fake(_forward)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.p = inputs[1]
    ctx.channels_last = is_channels_last(inputs[0])  # the order the mask was packed in
    ctx.kernels = current_mode()
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_mask):
    (packed,) = ctx.saved_tensors
    if use_triton(grad_y, ctx.kernels):
        from facto_fx.triton_ops.dropout import dropout_backward

        return dropout_backward(grad_y, packed, ctx.p, ctx.channels_last), None
    keep = unpack_codes(packed, 1, grad_y.shape, ctx.channels_last)
    return grad_y * keep / (1.0 - ctx.p), None


register_autograd(dropout_fwd, _backward, _setup_context)


def dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Dropout as F.dropout, with a 1-bit saved mask; identity outside training."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1); got {p}")
    if not training or p == 0.0:
        return x
    if not records_gradient(x):
        return torch.nn.functional.dropout(x, p, True)
    return torch.ops.facto.dropout(x, p)[0]
