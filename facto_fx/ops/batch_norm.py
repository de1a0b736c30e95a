"""facto::batch_norm — batch-norm with frozen statistics: a per-channel affine.

During low-rank training the running statistics are frozen, so batch-norm is y = x̂·γ + β with
x̂ = (x - μ)/σ fixed per channel. grad_x needs no saved map at all; grad_γ needs x̂, which is
saved mean-pooled (and only when γ is trained).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from facto_fx.ops.grads import register_autograd
from facto_fx.ops.lossy import cast, mean_pool, store, sum_pool
from facto_fx.ops.scale import spatial_kernel
from facto_fx.triton_ops.dispatch import current_mode, use_triton


@torch.library.custom_op("facto::batch_norm", mutates_args=())
def batch_norm_fwd(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    lossy_kernel: int,
    storage_dtype: torch.dtype | None,
    save_pooled: bool,
) -> tuple[Tensor, Tensor]:
    if use_triton(x):
        from facto_fx.triton_ops.affine import affine_forward

        rstd = torch.rsqrt(running_var + eps)
        return affine_forward(
            x, x.shape[1], lossy_kernel, storage_dtype, save_pooled, running_mean, rstd, weight, bias
        )
    return _forward(x, weight, bias, running_mean, running_var, eps, lossy_kernel, storage_dtype, save_pooled)


def _forward(x, weight, bias, running_mean, running_var, eps, lossy_kernel, storage_dtype, save_pooled):
    """The PyTorch path; on fake tensors, the fake kernel.

    Both y and the pooled x̂ = (meanpool_k(x) − μ)/σ (pooling commutes with the per-channel
    affine) come from torch's own inference batch-norm: one aten call each, computed in the
    statistics' precision and returned in x's dtype, and no full-size temporary besides y.
    """
    y = F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    if not save_pooled:
        return y, x.new_empty(0)
    pooled = mean_pool(x, spatial_kernel(x, lossy_kernel))
    pooled_hat = F.batch_norm(pooled, running_mean, running_var, None, None, False, 0.0, eps)
    return y, store(pooled_hat, storage_dtype)


batch_norm_fwd.register_fake(_forward)


def _setup_context(ctx, inputs, output):
    _, weight, bias, _, running_var, eps, lossy_kernel, _, _ = inputs
    ctx.save_for_backward(output[1], weight, running_var)
    ctx.eps = eps
    ctx.has_bias = bias is not None
    ctx.lossy_kernel = lossy_kernel
    ctx.kernels = current_mode()
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_pooled):
    pooled, weight, running_var = ctx.saved_tensors
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_weight, need_bias = need_weight and weight is not None, need_bias and ctx.has_bias
    if need_weight and pooled.numel() == 0:
        raise RuntimeError("facto::batch_norm ran with save_pooled=False, so no map was kept for γ's gradient")
    if use_triton(grad_y, ctx.kernels):
        from facto_fx.triton_ops.affine import affine_backward

        gain = torch.rsqrt(running_var + ctx.eps)
        if weight is not None:
            gain = gain * weight

        needs = (need_x, need_weight, need_bias)
        grads = affine_backward(grad_y, pooled, gain, grad_y.shape[1], ctx.lossy_kernel, needs)
        return *grads, None, None, None, None, None, None
    grad_x = grad_weight = grad_bias = None
    reduce_dims = [d for d in range(grad_y.dim()) if d != 1]
    # The small reductions first, so their pooled temporaries are gone before grad_x is allocated.
    if need_weight:
        grad_p = sum_pool(grad_y, spatial_kernel(grad_y, ctx.lossy_kernel))
        grad_weight = (grad_p * cast(pooled, grad_p.dtype)).sum(reduce_dims)
        del grad_p
    if need_bias:
        grad_bias = grad_y.sum(reduce_dims)
    if need_x:  # grad_y·γ/σ is an inference batch-norm of grad_y with zero mean and no shift
        zero_mean = running_var.new_zeros(running_var.shape)
        grad_x = F.batch_norm(grad_y, zero_mean, running_var, weight, None, False, 0.0, ctx.eps)
    return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


register_autograd(batch_norm_fwd, _backward, _setup_context)


def batch_norm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    lossy_kernel: int = 2,
    storage_dtype: torch.dtype | None = None,
) -> Tensor:
    """Frozen-statistics batch-norm over dim 1; saves pooled x̂ only if `weight` is trained."""
    trained = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    if not (torch.is_grad_enabled() and trained):
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    save_pooled = weight is not None and weight.requires_grad
    return torch.ops.facto.batch_norm(
        x, weight, bias, running_mean, running_var, eps, lossy_kernel, storage_dtype, save_pooled
    )[0]
