"""An error-bounded lossy codec for saved activations (SZ / cuSZp design; COMET, shared/papers/
error-bounded-lossy-compression.txt): every reconstructed element is within `eb` of the original.

**Format.** The tensor is read in memory order (a channels_last map as N·H·W·C, no copy) and cut
into blocks of BLOCK = 32 values, the last padded with zeros.

1. Quantise: q = round(x / 2eb) as int32, so x̂ = q · 2eb is within eb of x. Zeros stay exactly
   zero, so ReLU sparsity costs nothing.
2. Predict each value from its left neighbour inside its block (1-D Lorenzo, predecessor reset at
   every block): r_0 = q_0, r_i = q_i − q_{i−1}.
3. Per block, `widths` holds one byte: the bit length b of the largest |r_i|. A block with b > 0
   then appends 1 + b int32 words to `words`: the sign mask (bit i set: r_i < 0) and the b bit
   planes of |r_i| (plane k, bit i: bit k of |r_i|). An all-zero block costs its one byte; block
   offsets into `words` are the exclusive prefix sum of (b > 0)·(1 + b), so nothing else is stored.

**The bound is checked, not assumed.** x̂ is computed exactly as `decompress` computes it (the
fp32 product q · 2eb, rounded to x's dtype), and every element with |x̂ − x| > eb — float rounding,
a 16-bit dtype too coarse for eb, |x| / 2eb beyond the int32 range — is an *outlier*: its code is
0 and its exact value is stored in `outlier_value` at flat (memory-order) index `outlier_index`.
NaN and ±inf never satisfy the check, so they are outliers too and come back bit for bit.

**Size** in bytes: nblocks + 4·Σ(b>0)(1+b) + outliers·(8 + itemsize); `Codes.nbytes`.

**Host syncs.** The output's length depends on the data, so it is allocated exactly once its size
is known: the Triton codec (triton_ops/eb_codec.py) reads the word and outlier counts back to the
host once per tensor (one `.tolist()` of both) and decompresses with no sync; a worst-case buffer
would hold more than the input. This reference, written for clarity, syncs a few times per call.

**Rounding.** x / 2eb is a true division here and in the kernel; PyTorch's CUDA division by a
Python float multiplies by its reciprocal instead, so on CUDA this reference may round a half-way
value the other way than the kernel does. Either code is within eb; only the two paths' bytes differ.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from facto_fx.eb_format import BLOCK, CODEC_DTYPES, MAX_CODE, Codes, check_bound, memory_order, step_of
from facto_fx.ops.bitpack import pack_bits, unpack_bits


def quantize(flat: Tensor, eb: float) -> tuple[Tensor, Tensor]:
    """(q int32, outlier mask): q = round(x / 2eb), 0 where the decoded value would miss the bound."""
    step = step_of(eb)
    scaled = flat.float() / step if flat.dtype != torch.float64 else flat / step
    q = torch.round(scaled).clamp_(-MAX_CODE, MAX_CODE).to(torch.int32)
    decoded = dequantize(q, step, flat.dtype)
    return q.masked_fill_((outlier := _misses(decoded, flat, eb)), 0), outlier


_MARGIN = 2.0**-20  # far above fp32's rounding of a difference (2**-24 relative) and of eb itself


def _misses(decoded: Tensor, flat: Tensor, eb: float) -> Tensor:
    """~(|decoded − x| ≤ eb), exactly: the difference in fp32, and in fp64 for the rare elements
    whose fp32 difference lies within rounding of eb (NaN and inf always miss)."""
    if flat.dtype == torch.float64:
        return ~((decoded - flat).abs() <= eb)
    diff = (decoded.float() - flat.float()).abs()
    miss = ~(diff <= eb * (1 - _MARGIN))
    close = miss & (diff <= eb * (1 + _MARGIN))
    if close.any():
        index = close.nonzero().view(-1)
        miss[index] = ~((decoded[index].double() - flat[index].double()).abs() <= eb)
    return miss


def dequantize(q: Tensor, step: float, dtype: torch.dtype) -> Tensor:
    """x̂ = q · 2eb: an fp32 product (fp64 for fp64 tensors), rounded to `dtype`."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return (q.to(work) * step).to(dtype)


def _blocks(flat: Tensor) -> Tensor:
    pad = (-flat.numel()) % BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, BLOCK)


def _pack(bits: Tensor) -> Tensor:
    """Each row of 32 0/1 values as one int32 word, bit i holding lane i (bit 31 is the sign bit).

    Little-endian machines pack bytes (ops/bitpack.py, lane 8j + i at bit i of byte j) and read
    them as words; elsewhere each lane is shifted into place.
    """
    if sys.byteorder == "little":
        return pack_bits(bits, 1).view(torch.int32)
    lanes = torch.ones((), dtype=torch.int64, device=bits.device) << torch.arange(BLOCK, device=bits.device)
    return (bits.to(torch.int64) * lanes).sum(1).to(torch.int32)


def _unpack(words: Tensor) -> Tensor:
    """Inverse of `_pack`: (len(words), 32) uint8 0/1 lanes."""
    if sys.byteorder == "little":
        return unpack_bits(words.contiguous().view(torch.uint8), 1, words.numel() * BLOCK).view(-1, BLOCK)
    return ((words.unsqueeze(1) >> torch.arange(BLOCK, device=words.device)) & 1).to(torch.uint8)


def _narrowest(bits: int) -> torch.dtype:
    """The smallest integer dtype holding `bits`-bit magnitudes."""
    return torch.uint8 if bits <= 8 else torch.int16 if bits <= 15 else torch.int32


def bit_length(m: Tensor) -> Tensor:
    """Bits needed for each non-negative int32 value (0 for 0), exact through float64's frexp."""
    return torch.frexp(m.double())[1].to(torch.uint8)


def _word_starts(width: Tensor) -> Tensor:
    """Each block's first word in `words`: the exclusive prefix sum of (b > 0)·(1 + b)."""
    count = torch.where(width > 0, width + 1, 0)
    return torch.cumsum(count, 0) - count


def _widest_first(width: Tensor) -> tuple[Tensor, list[int]]:
    """The nonzero blocks, widest first, and for each plane k how many of them have it (width > k):
    plane k's blocks are then a prefix, and the work is the sum of the widths, not max × count."""
    order = torch.argsort(width, descending=True, stable=True)
    top = int(width[order[0]])
    has_plane = torch.bincount(width, minlength=top + 1).flip(0).cumsum(0).flip(0)[1:].tolist()
    return order[: has_plane[0]], has_plane


def encode(q: Tensor) -> tuple[Tensor, Tensor]:
    """(widths, words) of int32 codes `q` (flat, any length)."""
    blocks = _blocks(q)
    residual = torch.diff(blocks, dim=1, prepend=torch.zeros_like(blocks[:, :1]))
    magnitude = residual.abs()
    widths = bit_length(magnitude.amax(1))
    if not widths.numel() or int(widths.max()) == 0:
        return widths, q.new_empty(0)
    width = widths.to(torch.int64)
    order, has_plane = _widest_first(width)
    words = q.new_empty(has_plane[0] + sum(has_plane))  # a sign word per nonzero block, and its planes
    rows = _word_starts(width)[order]
    words[rows] = _pack(residual[order] < 0)
    magnitude = magnitude[order].to(_narrowest(len(has_plane)))  # bit planes from 1- or 2-byte values where they fit
    for k, count in enumerate(has_plane):
        words[rows[:count] + 1 + k] = _pack((magnitude[:count] >> k) & 1)
    return widths, words


def decode(widths: Tensor, words: Tensor, numel: int) -> Tensor:
    """The int32 codes back from (widths, words): the first `numel` of them, flat."""
    q = torch.zeros(widths.numel(), BLOCK, dtype=torch.int32, device=widths.device)
    if words.numel():
        width = widths.to(torch.int64)
        order, has_plane = _widest_first(width)
        rows = _word_starts(width)[order]
        sign = _unpack(words[rows])
        magnitude = torch.zeros(rows.numel(), BLOCK, dtype=_narrowest(len(has_plane)), device=widths.device)
        for k, count in enumerate(has_plane):
            magnitude[:count] |= _unpack(words[rows[:count] + 1 + k]).to(magnitude.dtype) << k
        magnitude = magnitude.to(torch.int32)
        q[order] = torch.cumsum(torch.where(sign.bool(), -magnitude, magnitude), dim=1, dtype=torch.int32)
    return q.view(-1)[:numel]


def compress(x: Tensor, eb: float) -> Codes:
    """`x` (any shape and layout, float) as Codes within `eb` of every element."""
    eb = check_bound(eb)
    if x.dtype not in CODEC_DTYPES:
        raise TypeError(f"the error-bounded codec compresses float tensors {CODEC_DTYPES}; got {x.dtype}")
    flat = memory_order(x)
    q, outlier = quantize(flat, eb)
    widths, words = encode(q)
    index = outlier.nonzero().view(-1)
    return Codes(widths, words, index, flat[index])


def decompress(codes: Codes, shape: torch.Size, dtype: torch.dtype, eb: float, channels_last: bool = False) -> Tensor:
    """The reconstructed tensor of `shape` and `dtype` (channels_last: in that layout, as the map
    was read); |x̂ − x| ≤ eb for every element, outliers exact."""
    out = torch.empty(shape, dtype=dtype, device=codes.widths.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    flat = memory_order(out)
    q = decode(codes.widths, codes.words, flat.numel())
    flat.copy_(dequantize(q, step_of(eb), dtype))
    flat[codes.outlier_index] = codes.outlier_value
    return out
