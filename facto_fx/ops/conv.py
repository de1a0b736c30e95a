"""facto::conv2d — Y = (W + reshape(M·D)) * X, saving only Z_p = meanpool_k(D_filter * X).

W is frozen and D is random, so the only weight gradient is grad_M (C_O x C_R), computed from
sumpool_k(grad_Y) and Z_p; grad_X uses Ω = W + ΔW rebuilt in backward (design.md §1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from facto_fx.ops.lossy import pair, pooled_projection, store, sum_pool
from facto_fx.triton_ops.dispatch import current_mode, use_triton


def delta_weight(weight: Tensor, M: Tensor, D: Tensor) -> Tensor:
    """ΔW = reshape(M·D) in the shape of the conv filter."""
    return (M @ D).view(weight.shape)


def merged_weight(weight: Tensor, M: Tensor, D: Tensor) -> Tensor:
    """Ω = W + reshape(M·D) (any weight shape) in one addmm.

    Its result is contiguous with canonical strides: `W + ΔW` of a 1×1 filter has size-1 dims whose
    strides real and fake kernels choose differently, and the conv backward picks its output layout
    from them (a compiled channels_last backward then failed on a view).
    """
    return torch.addmm(weight.reshape(weight.shape[0], -1), M, D).view(weight.shape)


@torch.library.custom_op("facto::conv2d", mutates_args=())
def conv2d_fwd(
    x: Tensor,
    weight: Tensor,
    M: Tensor,
    D: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    lossy_kernel: int,
    storage_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor]:
    return _forward(x, weight, M, D, bias, stride, padding, dilation, lossy_kernel, storage_dtype)


def _forward(x, weight, M, D, bias, stride, padding, dilation, lossy_kernel, storage_dtype):
    """The op's computation; on fake tensors, its fake kernel (same dtypes, shapes and strides).

    Ω is formed in the parameters' precision and cast once to x's dtype (bf16 under autocast).
    """
    omega = merged_weight(weight, M, D).to(x.dtype)
    y = F.conv2d(x, omega, None if bias is None else bias.to(x.dtype), stride, padding, dilation)
    d_filter = D.view(D.shape[0], *weight.shape[1:]).to(x.dtype)
    z_p = pooled_projection(x, d_filter, tuple(stride), tuple(padding), tuple(dilation), lossy_kernel)
    return y, store(z_p, storage_dtype)


conv2d_fwd.register_fake(_forward)


def _grad_m(grad_y: Tensor, z_p: Tensor, lossy_kernel: int, kernels: str) -> Tensor:
    if use_triton(grad_y, kernels):
        from facto_fx.triton_ops.conv import grad_m

        return grad_m(grad_y, z_p, lossy_kernel)
    grad_p = sum_pool(grad_y, lossy_kernel)
    return torch.einsum("bohw,brhw->or", grad_p, z_p.to(grad_p.dtype))


def _setup_context(ctx, inputs, output):
    x, weight, M, D, bias, stride, padding, dilation, lossy_kernel, _ = inputs
    ctx.save_for_backward(output[1], weight, M, D)
    ctx.x_shape = x.shape
    ctx.has_bias = bias is not None
    ctx.conv_args = (stride, padding, dilation)
    ctx.lossy_kernel = lossy_kernel
    ctx.kernels = current_mode()
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_z):
    z_p, weight, M, D = ctx.saved_tensors
    stride, padding, dilation = ctx.conv_args
    grad_x = grad_M = grad_bias = None
    if ctx.needs_input_grad[0]:
        # under autocast grad_y is 16-bit while the parameters stay fp32
        omega = merged_weight(weight, M, D).to(grad_y.dtype)
        grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, omega, grad_y, stride, padding, dilation)
    if ctx.needs_input_grad[2]:
        grad_M = _grad_m(grad_y, z_p, ctx.lossy_kernel, ctx.kernels).to(M.dtype)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad_y.sum((0, 2, 3))
    return grad_x, None, grad_M, None, grad_bias, None, None, None, None, None


conv2d_fwd.register_autograd(_backward, setup_context=_setup_context)


def conv2d(
    x: Tensor,
    weight: Tensor,
    M: Tensor,
    D: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    lossy_kernel: int = 2,
    storage_dtype: torch.dtype | None = None,
) -> Tensor:
    """Facto convolution; outside of training (no grad needed) it is a plain conv with Ω."""
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or M.requires_grad or (bias is not None and bias.requires_grad)
    )
    if not needs_grad:
        omega = merged_weight(weight, M, D).to(x.dtype)
        return F.conv2d(x, omega, None if bias is None else bias.to(x.dtype), stride, padding, dilation)
    y, _ = torch.ops.facto.conv2d(
        x, weight, M, D, bias, pair(stride), pair(padding), pair(dilation), lossy_kernel, storage_dtype
    )
    return y
