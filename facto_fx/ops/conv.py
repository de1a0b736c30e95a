"""facto::conv2d — Y = (W + reshape(M·D)) * X, saving only Z_p = meanpool_k(D_filter * X).

W is frozen and D is random, so the only weight gradient is grad_M (C_O x C_R), computed from
sumpool_k(grad_Y) and Z_p; grad_X uses Ω = W + ΔW rebuilt in backward (docs/design.md §1), or, where
that is cheaper (`factored`), W and D apart, so Ω is never formed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from facto_fx.ops.conv_input import conv2d_input
from facto_fx.ops.grads import records_gradient, register_autograd
from facto_fx.ops.lossy import cast, folds, mean_pool, pooled_filter, pooled_projection, store, sum_pool
from facto_fx.shapes import conv_output_size, pair
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


def projection_filter(
    D: Tensor, weight_shape: torch.Size, stride: tuple[int, int], dilation: tuple[int, int], lossy_kernel: int
) -> Tensor | None:
    """The pool-folded filter of D's rows, when the conv's Z_p uses one (a per-draw constant)."""
    if not folds(tuple(weight_shape[2:]), stride, dilation, lossy_kernel):
        return None
    return pooled_filter(D.view(D.shape[0], *weight_shape[1:]), stride, dilation, lossy_kernel)


def factored(x_shape: torch.Size, weight_shape: torch.Size, out_hw: tuple[int, int]) -> bool:
    """Whether conv(x, W) + M·conv(x, D) is cheaper than forming Ω = W + M·D.

    Ω costs O·R·F multiply-adds in forward and again in backward; the factored path pays
    B·H'·W'·R·(F + O) in each instead (a rank-R conv and a 1×1 conv). It wins when the output has
    fewer positions than output channels: late, small maps of wide layers at small batches.
    """
    out_channels, fan_in = weight_shape[0], weight_shape[1] * weight_shape[2] * weight_shape[3]
    return x_shape[0] * out_hw[0] * out_hw[1] * (fan_in + out_channels) < out_channels * fan_in


@torch.library.custom_op("facto::conv2d", mutates_args=())
def conv2d_fwd(
    x: Tensor,
    weight: Tensor,
    M: Tensor,
    D: Tensor,
    folded: Tensor | None,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    lossy_kernel: int,
    storage_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor]:
    return _forward(x, weight, M, D, folded, bias, stride, padding, dilation, lossy_kernel, storage_dtype)


def _forward(x, weight, M, D, folded, bias, stride, padding, dilation, lossy_kernel, storage_dtype):
    """The op's computation; on fake tensors, its fake kernel (same dtypes, shapes and strides).

    Everything runs in x's dtype (bf16 under autocast); Ω is formed in the parameters' precision
    and cast once. On the factored path the full-size rank-R map u = conv(x, D) gives both the
    low-rank term M·u and Z_p = meanpool_k(u).
    """
    dtype = x.dtype
    bias = None if bias is None else cast(bias, dtype)
    d_filter = cast(D, dtype).view(D.shape[0], *weight.shape[1:])
    out_hw = tuple(conv_output_size(x.shape[i], weight.shape[i], stride[i - 2], padding[i - 2], dilation[i - 2])
                   for i in (2, 3))
    if factored(x.shape, weight.shape, out_hw):
        u = F.conv2d(x, d_filter, None, stride, padding, dilation)
        y = F.conv2d(x, cast(weight, dtype), bias, stride, padding, dilation)
        y = y + F.conv2d(u, cast(M, dtype).view(*M.shape, 1, 1))
        return y, store(mean_pool(u, lossy_kernel), storage_dtype)
    y = F.conv2d(x, cast(merged_weight(weight, M, D), dtype), bias, stride, padding, dilation)
    folded = None if folded is None else cast(folded, dtype)
    z_p = pooled_projection(x, d_filter, tuple(stride), tuple(padding), tuple(dilation), lossy_kernel, folded)
    return y, store(z_p, storage_dtype)


conv2d_fwd.register_fake(_forward)


def _grad_m(grad_y: Tensor, z_p: Tensor, M: Tensor, lossy_kernel: int, kernels: str) -> Tensor:
    """grad_M = Σ sumpool_k(grad_Y) ⊗ Z_p: the weight gradient of a 1×1 conv from Z_p (M gives its shape)."""
    if use_triton(grad_y, kernels):
        from facto_fx.triton_ops.conv import grad_m

        return grad_m(grad_y, z_p, lossy_kernel)
    grad_p = sum_pool(grad_y, lossy_kernel)
    one_by_one = cast(M, grad_p.dtype).view(*M.shape, 1, 1)
    _, grad, _ = torch.ops.aten.convolution_backward(
        grad_p, cast(z_p, grad_p.dtype), one_by_one, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
        [False, True, False],
    )
    return grad.view(M.shape)


def _grad_x(grad_y: Tensor, x_shape, weight: Tensor, M: Tensor, D: Tensor, conv_args) -> Tensor:
    """grad_X through Ω, or on the factored path through W and D apart (Ω never formed)."""
    dtype = grad_y.dtype  # 16-bit under autocast, while the parameters stay fp32
    out_hw = tuple(grad_y.shape[2:])
    if factored(x_shape, weight.shape, out_hw):
        d_filter = cast(D, dtype).view(D.shape[0], *weight.shape[1:])
        grad_u = F.conv2d(grad_y, cast(M, dtype).t()[:, :, None, None])
        grad_x = conv2d_input(x_shape, cast(weight, dtype), grad_y, *conv_args)
        return grad_x + conv2d_input(x_shape, d_filter, grad_u, *conv_args)
    omega = cast(merged_weight(weight, M, D), dtype)
    return conv2d_input(x_shape, omega, grad_y, *conv_args)


def _setup_context(ctx, inputs, output):
    x, weight, M, D, _, bias, stride, padding, dilation, lossy_kernel, _ = inputs
    ctx.save_for_backward(output[1], weight, M, D)
    ctx.x_shape = x.shape
    ctx.has_bias = bias is not None
    ctx.conv_args = (stride, padding, dilation)
    ctx.lossy_kernel = lossy_kernel
    ctx.kernels = current_mode()
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_z):
    z_p, weight, M, D = ctx.saved_tensors
    grad_x = grad_M = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = _grad_x(grad_y, ctx.x_shape, weight, M, D, ctx.conv_args)
    if ctx.needs_input_grad[2]:
        grad_M = cast(_grad_m(grad_y, z_p, M, ctx.lossy_kernel, ctx.kernels), M.dtype)
    if ctx.has_bias and ctx.needs_input_grad[5]:
        grad_bias = grad_y.sum((0, 2, 3))
    return grad_x, None, grad_M, None, None, grad_bias, None, None, None, None, None


register_autograd(conv2d_fwd, _backward, _setup_context)


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
    folded: Tensor | None = None,
) -> Tensor:
    """Facto convolution; outside of training (no grad needed) it is a plain conv with Ω.

    `folded` is `projection_filter(D, ...)`, which a layer keeps per draw of D; without it the op
    forms it on every call.
    """
    needs_grad = records_gradient(x, M, bias)
    if not needs_grad:
        omega = cast(merged_weight(weight, M, D), x.dtype)
        return F.conv2d(x, omega, None if bias is None else cast(bias, x.dtype), stride, padding, dilation)
    y, _ = torch.ops.facto.conv2d(
        x, weight, M, D, folded, bias, pair(stride), pair(padding), pair(dilation), lossy_kernel, storage_dtype
    )
    return y
