"""Bit packing inside Triton kernels, with the layout of facto_fx.ops.bitpack.

Code i of a tensor goes to byte i // (8 // BITS), at bit offset (i % (8 // BITS)) · BITS, least
significant bits first. A kernel packs a block of BLOCK codes whose first index is a multiple of
8, so the block owns whole bytes and no two programs write the same byte.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pack(codes, BLOCK: tl.constexpr, BITS: tl.constexpr):
    """BLOCK codes (each < 2**BITS) -> BLOCK·BITS/8 bytes."""
    PER_BYTE: tl.constexpr = 8 // BITS
    grouped = tl.reshape(codes.to(tl.uint8), (BLOCK // PER_BYTE, PER_BYTE))
    shifts = (tl.arange(0, PER_BYTE) * BITS).to(tl.uint8)
    return tl.sum(grouped << shifts[None, :], axis=1).to(tl.uint8)


@triton.jit
def store_packed(packed_ptr, codes, block_start, n, BLOCK: tl.constexpr, BITS: tl.constexpr):
    """Pack the codes of elements [block_start, block_start + BLOCK) and store their bytes."""
    PER_BYTE: tl.constexpr = 8 // BITS
    byte = block_start // PER_BYTE + tl.arange(0, BLOCK // PER_BYTE)
    n_bytes = (n + PER_BYTE - 1) // PER_BYTE
    tl.store(packed_ptr + byte, pack(codes, BLOCK, BITS), mask=byte < n_bytes)


@triton.jit
def load_codes(packed_ptr, offsets, mask, BITS: tl.constexpr):
    """The codes of elements `offsets`, read from their bytes."""
    PER_BYTE: tl.constexpr = 8 // BITS
    byte = tl.load(packed_ptr + offsets // PER_BYTE, mask=mask, other=0).to(tl.int32)
    return (byte >> ((offsets % PER_BYTE) * BITS)) & ((1 << BITS) - 1)
