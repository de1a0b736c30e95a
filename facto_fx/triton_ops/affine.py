"""Per-channel affine (facto::scale, frozen batch-norm) with the mean-pooled map it saves.

Forward, one pass: y = x̂·a + b with x̂ = (x - μ)·ρ, and meanpool_k(x̂) in ceil mode (edge windows
average the values they cover). Backward, one pass over grad_y: grad_x = grad_y·gain, and the
per-plane partial sums of sumpool_k(grad_y)·pooled (for a or γ) and of grad_y (for b or β).

A tensor is seen as planes of H×W (NCHW maps) and plane p belongs to channel p % C; each
program covers BLOCK pooled positions of one plane, so its partial sums belong to one channel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from facto_fx.ops.lossy import pooled_size

BLOCK = 256


@triton.jit
def _affine_fwd_kernel(
    x_ptr, mean_ptr, rstd_ptr, a_ptr, b_ptr, y_ptr, pooled_ptr, C, H, W, PH, PW,
    K: tl.constexpr, SAVE: tl.constexpr, BLOCK: tl.constexpr,
):
    plane = tl.program_id(0).to(tl.int64)
    pos = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = pos < PH * PW
    ph, pw = pos // PW, pos % PW
    channel = plane % C
    mean, rstd = tl.load(mean_ptr + channel), tl.load(rstd_ptr + channel)
    a, b = tl.load(a_ptr + channel), tl.load(b_ptr + channel)
    total = tl.zeros((BLOCK,), tl.float32)
    count = tl.zeros((BLOCK,), tl.float32)
    for i in tl.static_range(K):
        for j in tl.static_range(K):
            h, w = ph * K + i, pw * K + j
            inside = in_bounds & (h < H) & (w < W)
            offset = (plane * H + h) * W + w
            x_hat = (tl.load(x_ptr + offset, mask=inside, other=0.0).to(tl.float32) - mean) * rstd
            tl.store(y_ptr + offset, (x_hat * a + b).to(y_ptr.dtype.element_ty), mask=inside)
            total += tl.where(inside, x_hat, 0.0)
            count += inside.to(tl.float32)
    if SAVE:
        pooled = total / tl.maximum(count, 1.0)
        tl.store(pooled_ptr + plane * PH * PW + pos, pooled.to(pooled_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def _affine_bwd_kernel(
    grad_y_ptr, pooled_ptr, gain_ptr, grad_x_ptr, grad_a_ptr, grad_b_ptr, C, H, W, PH, PW,
    K: tl.constexpr, GRAD_X: tl.constexpr, GRAD_A: tl.constexpr, GRAD_B: tl.constexpr, BLOCK: tl.constexpr,
):
    plane = tl.program_id(0).to(tl.int64)
    pos = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = pos < PH * PW
    ph, pw = pos // PW, pos % PW
    gain = tl.load(gain_ptr + plane % C)
    window_sum = tl.zeros((BLOCK,), tl.float32)
    for i in tl.static_range(K):
        for j in tl.static_range(K):
            h, w = ph * K + i, pw * K + j
            inside = in_bounds & (h < H) & (w < W)
            offset = (plane * H + h) * W + w
            grad = tl.load(grad_y_ptr + offset, mask=inside, other=0.0).to(tl.float32)
            if GRAD_X:
                tl.store(grad_x_ptr + offset, (grad * gain).to(grad_x_ptr.dtype.element_ty), mask=inside)
            window_sum += grad
    partial = plane * tl.num_programs(1) + tl.program_id(1)
    if GRAD_A:
        pooled = tl.load(pooled_ptr + plane * PH * PW + pos, mask=in_bounds, other=0.0).to(tl.float32)
        tl.store(grad_a_ptr + partial, tl.sum(window_sum * pooled, axis=0))
    if GRAD_B:
        tl.store(grad_b_ptr + partial, tl.sum(window_sum, axis=0))


def _planes(x: Tensor, k: int) -> tuple[int, int, int]:
    """(H, W, k) of the planes of `x`: NCHW maps pool their last two dims; other shapes do not pool."""
    if x.dim() == 4:
        return x.shape[-2], x.shape[-1], k
    return (x[0, 0].numel() if x.dim() > 2 else 1), 1, 1


def _per_channel(values: Tensor | float | None, default: float, channels: int, like: Tensor) -> Tensor:
    if values is None:
        values = default
    return torch.as_tensor(values, device=like.device).to(torch.float32).reshape(-1).expand(channels).contiguous()


def affine_forward(
    x: Tensor,
    channels: int,
    lossy_kernel: int,
    storage_dtype: torch.dtype | None,
    save_pooled: bool,
    mean: Tensor | None = None,
    rstd: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(x̂·weight + bias, meanpool_k(x̂) or an empty tensor), x̂ = (x - mean)·rstd per channel of dim 1.

    channels = 1 broadcasts one value to every element (facto::scale); missing terms are 0 or 1.
    """
    x = x.contiguous()
    height, width, k = _planes(x, lossy_kernel)
    ph, pw = pooled_size(height, k), pooled_size(width, k)
    planes = x.numel() // max(height * width, 1)
    y = torch.empty_like(x)
    if save_pooled:
        pooled_shape = (*x.shape[:-2], ph, pw) if x.dim() == 4 else x.shape
        pooled = x.new_empty(pooled_shape, dtype=storage_dtype or x.dtype)
    else:
        pooled = x.new_empty(0)
    params = [_per_channel(v, d, channels, x) for v, d in ((mean, 0.0), (rstd, 1.0), (weight, 1.0), (bias, 0.0))]
    if x.numel():
        grid = (planes, triton.cdiv(ph * pw, BLOCK))
        _affine_fwd_kernel[grid](
            x, *params, y, pooled, channels, height, width, ph, pw, K=k, SAVE=save_pooled, BLOCK=BLOCK
        )
    return y, pooled


def affine_backward(
    grad_y: Tensor,
    pooled: Tensor,
    gain: Tensor | float,
    channels: int,
    lossy_kernel: int,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad_y·gain, Σ sumpool_k(grad_y)·pooled, Σ grad_y), the sums per channel (fp32).

    `needs` says which of the three to compute; the others come back as None.
    """
    grad_y = grad_y.contiguous()
    height, width, k = _planes(grad_y, lossy_kernel)
    ph, pw = pooled_size(height, k), pooled_size(width, k)
    planes = grad_y.numel() // max(height * width, 1)
    blocks = triton.cdiv(ph * pw, BLOCK)
    grad_x = torch.empty_like(grad_y) if needs[0] else None
    partials = [grad_y.new_zeros(planes, blocks, dtype=torch.float32) if need else None for need in needs[1:]]
    if grad_y.numel():
        pooled = pooled.contiguous()
        _affine_bwd_kernel[(planes, blocks)](
            grad_y, pooled, _per_channel(gain, 1.0, channels, grad_y), grad_x, *partials,
            channels, height, width, ph, pw, K=k, GRAD_X=needs[0], GRAD_A=needs[1], GRAD_B=needs[2], BLOCK=BLOCK,
        )
    sums = [None if p is None else p.view(-1, channels, blocks).sum((0, 2)) for p in partials]
    return grad_x, *sums
