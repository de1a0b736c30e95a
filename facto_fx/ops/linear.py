"""facto::linear — y = x (W + M·D)^T + b, saving only D·x (paper eq. 8, Table 2).

Forming M·D costs out·R·in multiply-adds, as much as the layer itself at `R` rows of input; with
fewer rows (a CNN classifier at a small batch) the low-rank term goes through D·x instead:
y = x·Wᵀ + (D·x)·Mᵀ, and the backward likewise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from facto_fx.ops.conv import merged_weight
from facto_fx.ops.grads import records_gradient, register_autograd
from facto_fx.ops.lossy import cast, store


@torch.library.custom_op("facto::linear", mutates_args=())
def linear_fwd(
    x: Tensor,
    weight: Tensor,
    M: Tensor,
    D: Tensor,
    bias: Tensor | None,
    storage_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor]:
    return _forward(x, weight, M, D, bias, storage_dtype)


def _forward(x, weight, M, D, bias, storage_dtype):
    """The op's computation; on fake tensors, its fake kernel. Runs in x's dtype (see autocast.py)."""
    bias = None if bias is None else cast(bias, x.dtype)
    dx = F.linear(x, cast(D, x.dtype))
    if _factored(x, weight):
        y = F.linear(x, cast(weight, x.dtype), bias) + F.linear(dx, cast(M, x.dtype))
    else:
        y = F.linear(x, cast(merged_weight(weight, M, D), x.dtype), bias)
    return y, store(dx, storage_dtype)


def _factored(x: Tensor, weight: Tensor) -> bool:
    """Whether the rank-R path (rows·R·(in+out)) is cheaper than forming M·D (out·R·in).

    Symmetric in in/out, so the same test serves the forward (x) and the backward (grad_y).
    """
    rows = x.numel() // x.shape[-1]
    return rows * sum(weight.shape) < weight.numel()


linear_fwd.register_fake(_forward)


def _setup_context(ctx, inputs, output):
    _, weight, M, D, bias, _ = inputs
    ctx.save_for_backward(output[1], weight, M, D)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_dx):
    dx, weight, M, D = ctx.saved_tensors
    grad_x = grad_M = grad_bias = None
    if ctx.needs_input_grad[0]:
        if _factored(grad_y, weight):
            grad_x = grad_y @ cast(weight, grad_y.dtype) + (grad_y @ cast(M, grad_y.dtype)) @ cast(D, grad_y.dtype)
        else:
            grad_x = grad_y @ cast(merged_weight(weight, M, D), grad_y.dtype)  # 16-bit grad_y under autocast
    if ctx.needs_input_grad[2]:
        grad_M = grad_y.reshape(-1, grad_y.shape[-1]).T @ cast(dx.reshape(-1, dx.shape[-1]), grad_y.dtype)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    return grad_x, None, grad_M, None, grad_bias, None


register_autograd(linear_fwd, _backward, _setup_context)


def linear(
    x: Tensor,
    weight: Tensor,
    M: Tensor,
    D: Tensor,
    bias: Tensor | None = None,
    storage_dtype: torch.dtype | None = None,
) -> Tensor:
    """Facto linear layer; a plain linear with Ω when no gradient is needed."""
    needs_grad = records_gradient(x, M, bias)
    if not needs_grad:
        return F.linear(x, cast(merged_weight(weight, M, D), x.dtype), None if bias is None else cast(bias, x.dtype))
    y, _ = torch.ops.facto.linear(x, weight, M, D, bias, storage_dtype)
    return y
