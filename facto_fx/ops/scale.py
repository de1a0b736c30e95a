"""facto::scale — y = s·x for a learnable scalar s (fixup-ResNet), saving meanpool_k(x)."""

from __future__ import annotations

import torch
from torch import Tensor

from facto_fx.ops.grads import records_gradient, register_autograd
from facto_fx.ops.lossy import compress, sum_pool
from facto_fx.shapes import pooled_size
from facto_fx.triton_ops.dispatch import current_mode, use_triton


def spatial_kernel(x: Tensor, lossy_kernel: int) -> int:
    """Pooling applies to the two trailing spatial dims of NCHW maps only."""
    return lossy_kernel if x.dim() == 4 else 1


def pooled_shape(x: Tensor, lossy_kernel: int) -> tuple[int, ...]:
    """Shape of mean_pool(x, spatial_kernel(x, lossy_kernel)), for the fake kernels."""
    k = spatial_kernel(x, lossy_kernel)
    if k == 1:
        return tuple(x.shape)
    return (*x.shape[:-2], pooled_size(x.shape[-2], k), pooled_size(x.shape[-1], k))


@torch.library.custom_op("facto::scale", mutates_args=())
def scale_fwd(
    x: Tensor, s: Tensor, lossy_kernel: int, storage_dtype: torch.dtype | None, save_pooled: bool
) -> tuple[Tensor, Tensor]:
    if use_triton(x):
        from facto_fx.triton_ops.affine import affine_forward

        return affine_forward(x, 1, lossy_kernel, storage_dtype, save_pooled, weight=s)
    return _forward(x, s, lossy_kernel, storage_dtype, save_pooled)


def _forward(x: Tensor, s: Tensor, lossy_kernel: int, storage_dtype: torch.dtype | None, save_pooled: bool):
    """The PyTorch path; on fake tensors, the fake kernel. Computed in s's precision, returned in
    x's dtype like the Triton kernel (an fp32 scale does not promote a bf16 map)."""
    pooled = compress(x, spatial_kernel(x, lossy_kernel), storage_dtype) if save_pooled else x.new_empty(0)
    return (x * s).to(x.dtype), pooled


scale_fwd.register_fake(_forward)


def _setup_context(ctx, inputs, output):
    _, s, lossy_kernel, _, save_pooled = inputs
    ctx.save_for_backward(s, output[1])
    ctx.lossy_kernel = lossy_kernel
    ctx.kernels = current_mode()
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_pooled):
    s, pooled = ctx.saved_tensors
    need_x, need_s = ctx.needs_input_grad[:2]
    if need_s and pooled.numel() == 0:
        raise RuntimeError("facto::scale ran with save_pooled=False, so no map was kept for the scale's gradient")
    if use_triton(grad_y, ctx.kernels):
        from facto_fx.triton_ops.affine import affine_backward

        grad_x, grad_s, _ = affine_backward(grad_y, pooled, s, 1, ctx.lossy_kernel, (need_x, need_s, False))
        return grad_x, None if grad_s is None else grad_s.reshape(s.shape).to(s.dtype), None, None, None
    grad_x = grad_s = None
    if need_x:
        grad_x = grad_y * s
    if need_s:
        grad_p = sum_pool(grad_y, spatial_kernel(grad_y, ctx.lossy_kernel))
        grad_s = (grad_p * pooled.to(grad_p.dtype)).sum().reshape(s.shape)
    return grad_x, grad_s, None, None, None


register_autograd(scale_fwd, _backward, _setup_context)


def scale(x: Tensor, s: Tensor, lossy_kernel: int = 2, storage_dtype: torch.dtype | None = None) -> Tensor:
    """Multiply by a one-element tensor `s`; its gradient comes from the pooled input."""
    if s.numel() != 1:
        raise ValueError(f"facto scale expects a one-element scale tensor; got shape {tuple(s.shape)}")
    if not records_gradient(x, s):
        return (x * s).to(x.dtype)
    return torch.ops.facto.scale(x, s, lossy_kernel, storage_dtype, s.requires_grad)[0]
