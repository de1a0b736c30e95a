"""grad_M of facto::conv2d: Σ over batch and pooled positions of sumpool_k(grad_Y)[o] · Z_p[r].

One fused split-K matmul: the K axis runs over (batch, pooled row, pooled column); each A tile
is sum-pooled from grad_Y's k×k taps as it is loaded, so sumpool_k(grad_Y) never exists in
memory. grad_M is tiny (C_O×C_R) while K is large, so K is split across programs and their fp32
partial tiles are summed by torch. grad_Y and Z_p are each read in their own layout, NCHW or
channels_last (triton_ops/layout.py), so a channels_last map is not copied.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from facto_fx.shapes import pooled_size
from facto_fx.triton_ops.layout import kernel_layout, offset

BLOCK_O, BLOCK_R, BLOCK_K = 32, 32, 32


@triton.jit
def _grad_m_kernel(
    grad_y_ptr, z_ptr, partial_ptr, C_OUT, RANK, H, W, PH, PW, n_k, k_per_split,
    K: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, GRAD_CHANNELS_LAST: tl.constexpr, Z_CHANNELS_LAST: tl.constexpr,
):
    o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(2)
    acc = tl.zeros((BLOCK_O, BLOCK_R), tl.float32)
    k_start = split * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        kk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)  # (batch, pooled row, pooled column)
        k_ok = (kk < n_k) & (kk < k_start + k_per_split)
        pw = kk % PW
        ph = (kk // PW) % PH
        b = kk // (PW * PH)
        pooled_grad = tl.zeros((BLOCK_O, BLOCK_K), tl.float32)
        for i in tl.static_range(K):
            for j in tl.static_range(K):
                h, w = ph * K + i, pw * K + j
                tap = k_ok & (h < H) & (w < W)
                offsets = offset(b[None, :], o[:, None], h[None, :], w[None, :], C_OUT, H, W, GRAD_CHANNELS_LAST)
                mask = (o[:, None] < C_OUT) & tap[None, :]
                pooled_grad += tl.load(grad_y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        z_offsets = offset(b[:, None], r[None, :], ph[:, None], pw[:, None], RANK, PH, PW, Z_CHANNELS_LAST)
        z_mask = k_ok[:, None] & (r[None, :] < RANK)
        z = tl.load(z_ptr + z_offsets, mask=z_mask, other=0.0).to(tl.float32)
        acc += tl.dot(pooled_grad, z, input_precision=PRECISION)
    out = (split * C_OUT + o[:, None]) * RANK + r[None, :]
    tl.store(partial_ptr + out, acc, mask=(o[:, None] < C_OUT) & (r[None, :] < RANK))


def dot_precision() -> str:
    """Full fp32 products unless the user let torch's own matmuls use TF32."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _splits(tiles: int, k_blocks: int, device: torch.device) -> int:
    """Enough K-splits to give every streaming multiprocessor a few programs."""
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(k_blocks, programs // tiles))


def grad_m(grad_y: Tensor, z_p: Tensor, lossy_kernel: int) -> Tensor:
    """einsum("bohw,brhw->or", sumpool_k(grad_y), z_p) in fp32, without the pooled grad_y.

    The tile products are full fp32 (Triton's default on a GPU would be TF32, 10 mantissa bits)
    unless torch.backends.cuda.matmul.allow_tf32 is set.
    """
    (grad_y, grad_channels_last), (z_p, z_channels_last) = kernel_layout(grad_y), kernel_layout(z_p)
    batch, c_out, height, width = grad_y.shape
    rank = z_p.shape[1]
    ph, pw = pooled_size(height, lossy_kernel), pooled_size(width, lossy_kernel)
    n_k = batch * ph * pw
    tiles = (triton.cdiv(c_out, BLOCK_O), triton.cdiv(rank, BLOCK_R))
    k_blocks = triton.cdiv(n_k, BLOCK_K)
    splits = _splits(tiles[0] * tiles[1], k_blocks, grad_y.device)
    k_per_split = triton.cdiv(k_blocks, splits) * BLOCK_K
    partial = grad_y.new_zeros(splits, c_out, rank, dtype=torch.float32)
    if n_k:
        _grad_m_kernel[(*tiles, splits)](
            grad_y, z_p, partial, c_out, rank, height, width, ph, pw, n_k, k_per_split,
            K=lossy_kernel, BLOCK_O=BLOCK_O, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, PRECISION=dot_precision(),
            GRAD_CHANNELS_LAST=grad_channels_last, Z_CHANNELS_LAST=z_channels_last,
        )
    return partial.sum(0)
