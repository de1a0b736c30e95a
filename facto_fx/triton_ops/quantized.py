"""The quantized store of facto_fx.ops.quantized: quantize (per-group min / max, stochastic rounding,
packing) in one pass over the map, and dequantize.

A program takes GROUPS groups as a (GROUPS, BLOCK_G) tile, BLOCK_G = the group size rounded up to a
power of two: group k of the map is group k % (groups per sample) of sample k // (groups per
sample), and its elements are the next G (or, for a sample's last group, fewer) elements of that
sample in the map's memory order, so a channels_last map is read in place, in (N, H, W, C) order.

Quantize reduces each row to its min and max (in fp32: a 16-bit value converts exactly, so the
minimum is the reference's, bit for bit), stores min and scale = (max − min) · (1 / (2^b − 1)) (one
fp32 product, as the reference computes it), and draws u = tl.rand(seed + stream, index), the
element's index in memory order (mod 2^32) the Philox counter and the 64-bit seed, loaded from the
device, the key. With t = (x − min) / scale, q = clamp(floor(t) + [u < t − floor(t)], 0, 2^b − 1)
(ops/quantized.py's rule), 0 in a constant group. The
codes of a row are packed into whole bytes: a group starts on a byte (G is a multiple of 8), each
sample's codes on a byte of their own, and no two programs write one byte.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from facto_fx.triton_ops.layout import kernel_layout, memory_format

TILE = 1024  # elements a program covers: GROUPS = max(1, TILE // BLOCK_G)


@triton.jit
def _tile(pid, n_groups, groups_per_sample, sample_size, group, GROUPS: tl.constexpr, BLOCK_G: tl.constexpr):
    """The program's groups: (group ids, whether each exists, their sample, the position of their first
    element within it; per element: position within the sample, whether it exists, memory offset)."""
    gid = pid.to(tl.int64) * GROUPS + tl.arange(0, GROUPS)
    live = gid < n_groups
    sample = gid // groups_per_sample
    first = (gid - sample * groups_per_sample) * group
    j = tl.arange(0, BLOCK_G)
    pos = first[:, None] + j[None, :]
    valid = live[:, None] & (j[None, :] < group) & (pos < sample_size)
    return gid, live, sample, first, pos, valid, sample[:, None] * sample_size + pos


@triton.jit
def _quantize_kernel(
    x_ptr, codes_ptr, mins_ptr, scales_ptr, seed_ptr, stream, n_groups, groups_per_sample, sample_size,
    bytes_per_sample, group, inv_levels,
    BITS: tl.constexpr, GROUPS: tl.constexpr, BLOCK_G: tl.constexpr,
):
    gid, live, sample, first, pos, valid, offsets = _tile(
        tl.program_id(0), n_groups, groups_per_sample, sample_size, group, GROUPS, BLOCK_G
    )
    x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    lo = tl.min(tl.where(valid, x, float("inf")), axis=1)
    hi = tl.max(tl.where(valid, x, float("-inf")), axis=1)
    scale = (hi - lo) * inv_levels
    tl.store(mins_ptr + gid, lo, mask=live)
    tl.store(scales_ptr + gid, scale, mask=live)
    step = tl.where(scale > 0, scale, 1.0)[:, None]  # a constant group: t = 0, code 0
    t = tl.where(valid, (x - lo[:, None]) / step, 0.0)
    seed = tl.load(seed_ptr) + stream
    u = tl.rand(seed, offsets.to(tl.uint32))
    whole = tl.floor(t)
    LEVELS: tl.constexpr = (1 << BITS) - 1
    q = tl.minimum(tl.maximum(whole + tl.where(u < t - whole, 1.0, 0.0), 0.0), LEVELS)
    q = tl.where(valid, q, 0.0).to(tl.uint8)  # a sample's last byte is padded with zero codes
    PER_BYTE: tl.constexpr = 8 // BITS
    BYTES: tl.constexpr = BLOCK_G // PER_BYTE
    if PER_BYTE == 1:
        packed = q
    else:
        shifts = (tl.arange(0, PER_BYTE) * BITS).to(tl.uint8)
        packed = tl.sum(tl.reshape(q, (GROUPS, BYTES, PER_BYTE)) << shifts[None, None, :], axis=2).to(tl.uint8)
    b = tl.arange(0, BYTES)
    byte = first[:, None] // PER_BYTE + b[None, :]  # within the sample
    ok = live[:, None] & (b[None, :] < group // PER_BYTE) & (byte < bytes_per_sample)
    tl.store(codes_ptr + sample[:, None] * bytes_per_sample + byte, packed, mask=ok)


@triton.jit
def _dequantize_kernel(
    codes_ptr, mins_ptr, scales_ptr, y_ptr, n_groups, groups_per_sample, sample_size, bytes_per_sample, group,
    BITS: tl.constexpr, GROUPS: tl.constexpr, BLOCK_G: tl.constexpr,
):
    gid, live, sample, first, pos, valid, offsets = _tile(
        tl.program_id(0), n_groups, groups_per_sample, sample_size, group, GROUPS, BLOCK_G
    )
    lo = tl.load(mins_ptr + gid, mask=live, other=0.0)
    scale = tl.load(scales_ptr + gid, mask=live, other=0.0)
    PER_BYTE: tl.constexpr = 8 // BITS
    byte = tl.load(codes_ptr + sample[:, None] * bytes_per_sample + pos // PER_BYTE, mask=valid, other=0)
    q = (byte.to(tl.int32) >> ((pos % PER_BYTE) * BITS).to(tl.int32)) & ((1 << BITS) - 1)
    y = lo[:, None] + q.to(tl.float32) * scale[:, None]
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=valid)


def _blocks(group: int) -> tuple[int, int]:
    block_g = triton.next_power_of_2(group)
    return max(1, TILE // block_g), block_g


def quantize(
    x: Tensor, seed: Tensor, bits: int, group: int, samples: int, sample_size: int, stream: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """(packed codes, fp32 mins, fp32 scales) of x, `samples` samples of `sample_size` elements in
    memory order (facto_fx.ops.quantized.layout); `seed` a one-element int64 tensor on x's device."""
    x, _ = kernel_layout(x)
    groups_per_sample = -(-sample_size // group)
    bytes_per_sample = -(-sample_size * bits // 8)
    n_groups = samples * groups_per_sample
    codes = torch.empty(samples * bytes_per_sample, dtype=torch.uint8, device=x.device)
    mins = torch.empty(n_groups, dtype=torch.float32, device=x.device)
    scales = torch.empty(n_groups, dtype=torch.float32, device=x.device)
    if n_groups:
        groups, block_g = _blocks(group)
        _quantize_kernel[(triton.cdiv(n_groups, groups),)](
            x, codes, mins, scales, seed, stream, n_groups, groups_per_sample, sample_size, bytes_per_sample,
            group, 1.0 / ((1 << bits) - 1), BITS=bits, GROUPS=groups, BLOCK_G=block_g,
        )
    return codes, mins, scales


def dequantize(
    codes: Tensor, mins: Tensor, scales: Tensor, bits: int, group: int, shape: list[int], channels_last: bool,
    dtype: torch.dtype, samples: int, sample_size: int,
) -> Tensor:
    """min + q · scale as a `dtype` tensor of `shape`, channels_last if asked (the codes' order)."""
    y = torch.empty(shape, dtype=dtype, device=codes.device, memory_format=memory_format(channels_last))
    groups_per_sample = -(-sample_size // group)
    n_groups = samples * groups_per_sample
    if n_groups and y.numel():
        groups, block_g = _blocks(group)
        _dequantize_kernel[(triton.cdiv(n_groups, groups),)](
            codes, mins, scales, y, n_groups, groups_per_sample, sample_size, -(-sample_size * bits // 8), group,
            BITS=bits, GROUPS=groups, BLOCK_G=block_g,
        )
    return y
