"""Triton kernels for the error-bounded codec, bit for bit the format of facto_fx/ops/eb_codec.py
(read its docstring first): the same widths, words and outliers, the same reconstruction.

compress runs two kernels over the map in memory order, each program a tile of GROUP blocks × 32:

1. `_quantize_kernel` quantises, predicts and writes each block's width (uint8) and outlier
   count. Nothing per element is written: a scratch copy of the codes would cost a third of the
   map's bytes at the moment the codec is meant to free memory.
2. The launcher turns widths into word counts (b > 0)·(1 + b) and takes inclusive prefix sums of
   words and outliers on the device, then reads the two totals back in ONE host sync and
   allocates `words`, `outlier_index` and `outlier_value` exactly.
3. `_pack_kernel` recomputes the residuals (cheaper than storing them; the second read of x is
   the only extra traffic) and writes each block's sign mask and bit planes at its word offset,
   and its outliers' indices and exact values at its outlier offset, so they come out ascending.

decompress runs `_unpack_kernel` (word offsets from a prefix sum of the widths on the device, no
sync), then scatters the outliers with plain indexing. float64 stays on the PyTorch path.

**Exact arithmetic.** Every step is the reference's, in the same precision and rounding:
x / 2eb is an IEEE division (`div_rn`; Triton's plain `/` on fp32 compiles to an approximate
division on NVIDIA GPUs); torch.round's ties-to-even is rebuilt from floor (`_round_half_even`,
exact for every fp32, since libdevice.rint does not run in the interpreter); the decoded value is
the fp32 product q·2eb rounded to x's dtype; the bound is checked in fp64 against eb passed as an
fp64 argument (a plain float argument would be fp32). bf16 goes to and from fp32 by bit
manipulation (`_widen`, `_round_to`), exact on the GPU and in the interpreter, whose own bf16
casts truncate and mishandle subnormals. Residuals and prefix sums are int32 and wrap exactly as
the reference's do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from facto_fx.eb_format import BLOCK, MAX_CODE, Codes, check_bound, memory_order, step_of

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # fp64 stays on the PyTorch path
QUANTIZE_GROUP = 32  # blocks per program of _quantize_kernel: a 32×32 tile
PACK_GROUP = 4  # blocks per program of _pack_kernel / _unpack_kernel: a 4×32×32 tile of bits
CODE_LIMIT = tl.constexpr(float(MAX_CODE))  # the clamp, as the fp32 value torch clamps to


@triton.jit
def _round_half_even(s):
    """torch.round of fp32 `s`: the nearest integer, ties to even; ±inf and NaN unchanged.

    Exact for every fp32: s − floor(s) and floor(s)/2 are exact, and r + 1 only happens below
    2**23, where it is exact too (from 2**23 up every fp32 is an integer, so frac is 0).
    """
    r = tl.floor(s)  # NVIDIA: cvt.rmi.ftz, a subnormal s floors to ±0, not 0/−1; it rounds to 0 either way
    frac = s - r
    half = r * 0.5
    odd = half != tl.floor(half)
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def _round_to(v, dtype: tl.constexpr):
    """fp32 `v` rounded to `dtype`, to nearest even as torch casts. bf16 is rounded by hand, with
    the bias trick torch itself uses (NaN to 0x7FC0): the interpreter truncates fp32 → bf16 where
    the GPU rounds, and this form is the same, exact, on both."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
        rounded = tl.where(v != v, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def _widen(v):
    """`v` as fp32, exactly. bf16 by hand, as its bits shifted into the high half: the
    interpreter's bf16 → fp32 cast gets subnormals wrong, and the shift is exact on both."""
    if v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def _codes(x_ptr, offsets, valid, step, eb):
    """(q int32, outlier, x) at `offsets`, as ops.eb_codec.quantize: q = round(x / step) clamped, 0
    at outliers; an outlier is a valid element whose decoded (q·step in fp32, rounded to x's
    dtype) misses x by more than eb in fp64, so NaN and ±inf always are. Invalid lanes: q = 0."""
    x = tl.load(x_ptr + offsets, mask=valid, other=0.0)
    wide = _widen(x)
    scaled = tl.math.div_rn(wide, step)
    q = _round_half_even(scaled)
    q = tl.where(q > CODE_LIMIT, CODE_LIMIT, tl.where(q < -CODE_LIMIT, -CODE_LIMIT, q))
    # A NaN code is 0 here; the reference's int cast of it is undefined (INT_MIN on x86, 0 on CUDA).
    # It only matters where step is 0 (eb < ~7e-46) and x = 0: there the words may differ, both exact.
    q = tl.where(q == q, q, 0.0).to(tl.int32)
    decoded = _round_to(q.to(tl.float32) * step, x.dtype)
    within = tl.abs(_widen(decoded).to(tl.float64) - wide.to(tl.float64)) <= eb
    outlier = valid & ~within
    return tl.where(outlier, 0, q), outlier, x


@triton.jit
def _residuals(x_ptr, n, pid, step, eb, GROUP: tl.constexpr, LANES: tl.constexpr):
    """The Lorenzo residuals r_i = q_i − q_{i−1} (int32, wrapping like the reference's) of the
    program's GROUP blocks as a (GROUP, LANES) tile, with the outlier flags, x and the offsets.

    The left neighbour's code is recomputed from x rather than shifted in registers: lane 0 has
    none (the predictor resets per block), and lanes past n are the reference's zero padding."""
    tl.static_assert(LANES == 32, "a block's sign mask and bit planes are int32 words")
    block = pid.to(tl.int64) * GROUP + tl.arange(0, GROUP)
    lane = tl.arange(0, LANES)
    offsets = block[:, None] * LANES + lane[None, :]
    q, outlier, x = _codes(x_ptr, offsets, offsets < n, step, eb)
    prev, _, _ = _codes(x_ptr, offsets - 1, (lane[None, :] > 0) & (offsets - 1 < n), step, eb)
    return q - prev, outlier, x, offsets, block


@triton.jit
def _width(r, LANES: tl.constexpr):
    """(|r| wrapping as torch's int32 abs, each row's bit length of its largest |r|) — the
    reference's frexp exponent, counted as the shifts that leave a nonzero value."""
    magnitude = tl.where(r < 0, -r, r)
    largest = tl.max(magnitude, axis=1)
    shifts = tl.arange(0, LANES)
    width = tl.sum(((largest[:, None] >> shifts[None, :]) != 0).to(tl.int32), axis=1)
    return magnitude, width


@triton.jit
def _quantize_kernel(x_ptr, widths_ptr, outliers_ptr, n, nblocks, step: tl.float32, eb: tl.float64,
                     GROUP: tl.constexpr, LANES: tl.constexpr):
    """Per block: its width (uint8) and its number of outliers (int32)."""
    r, outlier, _, _, block = _residuals(x_ptr, n, tl.program_id(0), step, eb, GROUP, LANES)
    _, width = _width(r, LANES)
    real = block < nblocks
    tl.store(widths_ptr + block, width.to(tl.uint8), mask=real)
    tl.store(outliers_ptr + block, tl.sum(outlier.to(tl.int32), axis=1), mask=real)


@triton.jit
def _pack_kernel(x_ptr, word_end_ptr, outlier_end_ptr, words_ptr, index_ptr, value_ptr, n, nblocks,
                 step: tl.float32, eb: tl.float64, GROUP: tl.constexpr, LANES: tl.constexpr):
    """Each block's words (sign mask, then planes 0..b−1) and its outliers, at the offsets the
    inclusive prefix sums `word_end` / `outlier_end` (int64) give, less the block's own count."""
    r, outlier, x, offsets, block = _residuals(x_ptr, n, tl.program_id(0), step, eb, GROUP, LANES)
    magnitude, width = _width(r, LANES)
    real = block < nblocks

    # Word j of a block: j = 0 the sign mask, j ≥ 1 bit plane j − 1 of |r|; bit i of it is lane i.
    # A (GROUP, lane, word) tile of bits summed over lanes: the bits are disjoint, so the int32 sum
    # is their OR, lane 31 landing in the sign bit as the reference's int64 → int32 cast puts it.
    lane = tl.arange(0, LANES)
    j = tl.arange(0, LANES)
    jj = j[None, None, :]
    bits = tl.where(jj == 0, (r < 0).to(tl.int32)[:, :, None], (magnitude[:, :, None] >> tl.maximum(jj - 1, 0)) & 1)
    word = tl.sum(bits << lane[None, :, None], axis=1)
    count = tl.where(width > 0, width + 1, 0)
    word_start = tl.load(word_end_ptr + block, mask=real, other=0) - count
    used = real[:, None] & (j[None, :] < count[:, None])
    tl.store(words_ptr + word_start[:, None] + j[None, :], word, mask=used)

    # Outliers: the block's in lane order after those of the blocks before it.
    flag = outlier.to(tl.int32)
    block_outliers = tl.sum(flag, axis=1)
    outlier_start = tl.load(outlier_end_ptr + block, mask=real, other=0) - block_outliers
    slot = outlier_start[:, None] + (tl.cumsum(flag, axis=1) - flag)
    tl.store(index_ptr + slot, offsets, mask=outlier)
    tl.store(value_ptr + slot, x, mask=outlier)


@triton.jit
def _unpack_kernel(widths_ptr, word_end_ptr, words_ptr, out_ptr, n, nblocks, step: tl.float32,
                   GROUP: tl.constexpr, LANES: tl.constexpr):
    """Each block's codes from its words (residuals, then their prefix sum), written as q·step
    (fp32, rounded to the output's dtype); a block of width 0 decodes to zeros."""
    tl.static_assert(LANES == 32, "a block's sign mask and bit planes are int32 words")
    block = tl.program_id(0).to(tl.int64) * GROUP + tl.arange(0, GROUP)
    real = block < nblocks
    width = tl.load(widths_ptr + block, mask=real, other=0).to(tl.int32)
    count = tl.where(width > 0, width + 1, 0)
    word_start = tl.load(word_end_ptr + block, mask=real, other=0) - count
    j = tl.arange(0, LANES)
    word = tl.load(words_ptr + word_start[:, None] + j[None, :], mask=real[:, None] & (j[None, :] < count[:, None]),
                   other=0)

    # bit i of word j: the (GROUP, lane, word) tile; word 0 is the sign, word j ≥ 1 plane j − 1.
    lane = tl.arange(0, LANES)
    bits = (word[:, None, :] >> lane[None, :, None]) & 1
    jj = j[None, None, :]
    sign = tl.sum(tl.where(jj == 0, bits, 0), axis=2)
    magnitude = tl.sum(tl.where(jj > 0, bits << tl.maximum(jj - 1, 0), 0), axis=2)
    q = tl.cumsum(tl.where(sign != 0, -magnitude, magnitude), axis=1)

    offsets = block[:, None] * LANES + lane[None, :]
    value = _round_to(q.to(tl.float32) * step, out_ptr.dtype.element_ty)
    tl.store(out_ptr + offsets, value, mask=offsets < n)


def _word_end(widths: Tensor) -> Tensor:
    """Inclusive prefix sum (int64) of the blocks' word counts (b > 0)·(1 + b)."""
    width = widths.to(torch.int64)
    return torch.cumsum(torch.where(width > 0, width + 1, 0), 0)


def compress(x: Tensor, eb: float) -> Codes:
    """`x` (any shape and layout, float) as Codes within `eb` of every element; equal to
    ops.eb_codec.compress(x, eb) field by field. One host sync (the word and outlier totals)."""
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(f"the Triton codec compresses {TRITON_DTYPES}; got {x.dtype} (use ops.eb_codec)")
    eb = check_bound(eb)
    flat = memory_order(x)
    n, device = flat.numel(), flat.device
    nblocks = triton.cdiv(n, BLOCK)
    if n == 0:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return Codes(torch.empty(0, dtype=torch.uint8, device=device), torch.empty(0, dtype=torch.int32, device=device),
                     empty, flat[empty])
    step = step_of(eb)

    widths = torch.empty(nblocks, dtype=torch.uint8, device=device)
    outliers = torch.empty(nblocks, dtype=torch.int32, device=device)
    _quantize_kernel[(triton.cdiv(nblocks, QUANTIZE_GROUP),)](
        flat, widths, outliers, n, nblocks, step, eb, GROUP=QUANTIZE_GROUP, LANES=BLOCK)

    word_end = _word_end(widths)
    outlier_end = torch.cumsum(outliers, 0, dtype=torch.int64)
    total_words, total_outliers = torch.stack([word_end[-1], outlier_end[-1]]).tolist()  # the one sync

    words = torch.empty(total_words, dtype=torch.int32, device=device)
    index = torch.empty(total_outliers, dtype=torch.int64, device=device)
    value = torch.empty(total_outliers, dtype=x.dtype, device=device)
    _pack_kernel[(triton.cdiv(nblocks, PACK_GROUP),)](
        flat, word_end, outlier_end, words, index, value, n, nblocks, step, eb, GROUP=PACK_GROUP, LANES=BLOCK)
    return Codes(widths, words, index, value)


def decompress(codes: Codes, shape: torch.Size, dtype: torch.dtype, eb: float, channels_last: bool = False) -> Tensor:
    """The reconstructed tensor of `shape` and `dtype` (channels_last: in that layout, as the map
    was read); equal to ops.eb_codec.decompress. No host sync."""
    if dtype not in TRITON_DTYPES:
        raise TypeError(f"the Triton codec decompresses {TRITON_DTYPES}; got {dtype} (use ops.eb_codec)")
    out = torch.empty(shape, dtype=dtype, device=codes.widths.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    flat = memory_order(out)
    nblocks = codes.widths.numel()
    if flat.numel():
        _unpack_kernel[(triton.cdiv(nblocks, PACK_GROUP),)](
            codes.widths, _word_end(codes.widths), codes.words, flat, flat.numel(), nblocks, step_of(eb),
            GROUP=PACK_GROUP, LANES=BLOCK)
    flat[codes.outlier_index] = codes.outlier_value
    return out
