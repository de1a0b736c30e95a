"""Per-channel affine (facto::scale, frozen batch-norm) with the mean-pooled map it saves.

Forward, one pass: y = x̂·a + b with x̂ = (x - μ)·ρ, and meanpool_k(x̂) in ceil mode (edge windows
average the values they cover). Backward, one pass over grad_y: grad_x = grad_y·gain, and the
per-channel partial sums of sumpool_k(grad_y)·pooled (for a or γ) and of grad_y (for b or β).

A tensor is seen as an N×C×H×W map (other shapes as N×C×L×1, which do not pool), NCHW or
channels_last (triton_ops/layout.py), and each program covers a tile of BLOCK_P pooled positions
of one image by BLOCK_C channels. On NCHW maps a tile is one channel (its plane is contiguous); on
channels_last maps it is a run of neighbouring channels (they are contiguous), so both layouts are
read in memory order. The backward's partial sums are per channel of each tile; torch adds them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from facto_fx.shapes import pooled_size
from facto_fx.triton_ops.layout import in_layout, kernel_layout, memory_format, offset

BLOCK = 256  # elements of a tile
MAX_BLOCK_C = 32  # channels of a channels_last tile


@triton.jit
def _parameter(ptr, c, C, PRESENT: tl.constexpr, STRIDE: tl.constexpr, default: tl.constexpr, BLOCK_C: tl.constexpr):
    """A (1, BLOCK_C) row of per-channel values in fp32: channel c's (STRIDE 0: the one value for
    all), or `default` where the term is absent."""
    if PRESENT:
        value = tl.load(ptr + c * STRIDE, mask=c < C).to(tl.float32)[None, :]
    else:
        value = tl.full((1, BLOCK_C), default, tl.float32)
    return value


@triton.jit
def _affine_fwd_kernel(
    x_ptr, mean_ptr, rstd_ptr, a_ptr, b_ptr, y_ptr, pooled_ptr, C, H, W, PH, PW,
    K: tl.constexpr, SAVE: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_MEAN: tl.constexpr, HAS_RSTD: tl.constexpr, HAS_A: tl.constexpr, HAS_B: tl.constexpr,
    PARAM_STRIDE: tl.constexpr,
):
    n = (tl.program_id(0) // tl.cdiv(C, BLOCK_C)).to(tl.int64)
    c = (tl.program_id(0) % tl.cdiv(C, BLOCK_C)) * BLOCK_C + tl.arange(0, BLOCK_C)
    pos = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    ph, pw = (pos // PW)[:, None], (pos % PW)[:, None]
    in_bounds = (pos < PH * PW)[:, None] & (c < C)[None, :]
    mean = _parameter(mean_ptr, c, C, HAS_MEAN, PARAM_STRIDE, 0.0, BLOCK_C)
    rstd = _parameter(rstd_ptr, c, C, HAS_RSTD, PARAM_STRIDE, 1.0, BLOCK_C)
    a = _parameter(a_ptr, c, C, HAS_A, PARAM_STRIDE, 1.0, BLOCK_C)
    b = _parameter(b_ptr, c, C, HAS_B, PARAM_STRIDE, 0.0, BLOCK_C)
    total = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    count = tl.zeros((BLOCK_P, 1), tl.float32)
    for i in tl.static_range(K):
        for j in tl.static_range(K):
            h, w = ph * K + i, pw * K + j
            inside = in_bounds & (h < H) & (w < W)
            x_offset = offset(n, c[None, :], h, w, C, H, W, CHANNELS_LAST)
            x_hat = (tl.load(x_ptr + x_offset, mask=inside, other=0.0).to(tl.float32) - mean) * rstd
            tl.store(y_ptr + x_offset, (x_hat * a + b).to(y_ptr.dtype.element_ty), mask=inside)
            total += tl.where(inside, x_hat, 0.0)
            count += ((h < H) & (w < W)).to(tl.float32)
    if SAVE:
        pooled = total / tl.maximum(count, 1.0)
        pooled_offset = offset(n, c[None, :], ph, pw, C, PH, PW, CHANNELS_LAST)
        tl.store(pooled_ptr + pooled_offset, pooled.to(pooled_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def _affine_bwd_kernel(
    grad_y_ptr, pooled_ptr, gain_ptr, grad_x_ptr, grad_a_ptr, grad_b_ptr, C, H, W, PH, PW,
    K: tl.constexpr, GRAD_X: tl.constexpr, GRAD_A: tl.constexpr, GRAD_B: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, PARAM_STRIDE: tl.constexpr,
):
    n = (tl.program_id(0) // tl.cdiv(C, BLOCK_C)).to(tl.int64)
    c = (tl.program_id(0) % tl.cdiv(C, BLOCK_C)) * BLOCK_C + tl.arange(0, BLOCK_C)
    pos = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    ph, pw = (pos // PW)[:, None], (pos % PW)[:, None]
    in_bounds = (pos < PH * PW)[:, None] & (c < C)[None, :]
    gain = _parameter(gain_ptr, c, C, True, PARAM_STRIDE, 1.0, BLOCK_C)
    window_sum = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for i in tl.static_range(K):
        for j in tl.static_range(K):
            h, w = ph * K + i, pw * K + j
            inside = in_bounds & (h < H) & (w < W)
            y_offset = offset(n, c[None, :], h, w, C, H, W, CHANNELS_LAST)
            grad = tl.load(grad_y_ptr + y_offset, mask=inside, other=0.0).to(tl.float32)
            if GRAD_X:
                tl.store(grad_x_ptr + y_offset, (grad * gain).to(grad_x_ptr.dtype.element_ty), mask=inside)
            window_sum += grad
    partial = (n * tl.num_programs(1) + tl.program_id(1)) * C + c  # row (image, tile of positions), column c
    if GRAD_A:
        pooled_offset = offset(n, c[None, :], ph, pw, C, PH, PW, CHANNELS_LAST)
        pooled = tl.load(pooled_ptr + pooled_offset, mask=in_bounds, other=0.0).to(tl.float32)
        tl.store(grad_a_ptr + partial, tl.sum(window_sum * pooled, axis=0), mask=c < C)
    if GRAD_B:
        tl.store(grad_b_ptr + partial, tl.sum(window_sum, axis=0), mask=c < C)


def _as_map(x: Tensor) -> Tensor:
    """x as an N×C×H×W map: (N, C, ...) as N×C×L×1, fewer dims as 1×numel×1×1 (a view where it can be)."""
    if x.dim() == 4:
        return x
    if x.dim() >= 2:
        return x.reshape(*x.shape[:2], -1, 1)
    return x.reshape(1, -1, 1, 1)


def _tiles(maps: Tensor, k: int, channels_last: bool) -> tuple[int, int, tuple[int, int]]:
    """(pooled positions per tile, channels per tile, grid) of `maps` pooled by k."""
    batch, channels, height, width = maps.shape
    block_c = min(triton.next_power_of_2(channels), MAX_BLOCK_C) if channels_last else 1
    block_p = BLOCK // block_c
    c_blocks = triton.cdiv(channels, block_c)
    grid = (batch * c_blocks, triton.cdiv(pooled_size(height, k) * pooled_size(width, k), block_p))
    return block_p, block_c, grid


def _parameters(values: Sequence[Tensor | float | None], channels: int, maps: Tensor) -> tuple[list[Tensor], int]:
    """The kernel's view of per-channel terms: each as a flat tensor of `channels` values (1: one
    for every channel; a float becomes one), or `maps` as a placeholder for an absent term (its
    HAS_ flag is off), and the stride between channels (0 for one value). The kernel reads any
    float dtype and converts, so parameters are passed as they are: no call per term per step."""
    if channels not in (1, maps.shape[1]):
        raise ValueError(f"per-channel terms need 1 or {maps.shape[1]} values; got channels={channels}")
    flat = []
    for v in values:
        if v is None:
            flat.append(maps)
            continue
        v = torch.as_tensor(v, dtype=torch.float32, device=maps.device) if not isinstance(v, Tensor) else v
        if v.numel() != channels:
            raise ValueError(f"a per-channel term has {v.numel()} values where {channels} were expected")
        flat.append(v if v.dim() == 1 and v.stride(0) == 1 else v.reshape(-1).contiguous())
    return flat, int(channels != 1)


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
    y and the pooled map are channels_last if x is, else contiguous.
    """
    maps, channels_last = kernel_layout(_as_map(x))
    batch, map_channels, height, width = maps.shape
    k = lossy_kernel if x.dim() == 4 else 1
    ph, pw = pooled_size(height, k), pooled_size(width, k)
    y = torch.empty_like(maps)
    if save_pooled:
        pooled = torch.empty(
            (batch, map_channels, ph, pw), dtype=storage_dtype or x.dtype, device=x.device,
            memory_format=memory_format(channels_last),
        )
    else:
        pooled = x.new_empty(0)
    terms = (mean, rstd, weight, bias)
    params, stride = _parameters(terms, channels, maps)
    if maps.numel():
        block_p, block_c, grid = _tiles(maps, k, channels_last)
        has_mean, has_rstd, has_a, has_b = (t is not None for t in terms)
        _affine_fwd_kernel[grid](
            maps, *params, y, pooled, map_channels, height, width, ph, pw,
            K=k, SAVE=save_pooled, CHANNELS_LAST=channels_last, BLOCK_P=block_p, BLOCK_C=block_c,
            HAS_MEAN=has_mean, HAS_RSTD=has_rstd, HAS_A=has_a, HAS_B=has_b, PARAM_STRIDE=stride,
        )
    if x.dim() != 4:  # maps stay as they are: a view would renumber the strides of their size-1 dims
        y = y.view(x.shape)
        pooled = pooled.view(x.shape) if save_pooled else pooled
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

    `needs` says which of the three to compute; the others come back as None. The kernel runs in
    grad_y's layout (channels_last or contiguous); grad_x takes it too.
    """
    maps, channels_last = kernel_layout(_as_map(grad_y))
    batch, map_channels, height, width = maps.shape
    k = lossy_kernel if grad_y.dim() == 4 else 1
    ph, pw = pooled_size(height, k), pooled_size(width, k)
    grad_x = torch.empty_like(maps) if needs[0] else None
    block_p, block_c, grid = _tiles(maps, k, channels_last)
    partials = [maps.new_empty(batch * grid[1], map_channels, dtype=torch.float32) if need else None
                for need in needs[1:]]
    if maps.numel():
        if needs[1]:
            pooled = in_layout(_as_map(pooled), channels_last)
        (gain,), stride = _parameters((gain,), channels, maps)
        _affine_bwd_kernel[grid](
            maps, pooled, gain, grad_x, *partials,
            map_channels, height, width, ph, pw,
            K=k, GRAD_X=needs[0], GRAD_A=needs[1], GRAD_B=needs[2], CHANNELS_LAST=channels_last,
            BLOCK_P=block_p, BLOCK_C=block_c, PARAM_STRIDE=stride,
        )
    sums = [None if p is None else p.view(-1, channels).sum(0) for p in partials]
    if grad_x is not None and grad_y.dim() != 4:
        grad_x = grad_x.view(grad_y.shape)
    return grad_x, *sums
