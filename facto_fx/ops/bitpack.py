"""Pack small integer codes (1, 2, 4 or 8 bits each) into uint8 bytes, and back.

ReLU and dropout masks are 1-bit codes; max-pool argmax codes use 2 or 4 bits. Packing is along
the flattened tensor, so any shape works; the byte count is ceil(numel * bits / 8).

Codes go in the memory order of the map they describe: (N, H, W, C) for a channels_last map, the
logical order for any other tensor. A channels_last map's codes then flatten without a copy, and
a kernel that walks the map in memory order packs whole bytes of neighbouring elements.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor

from facto_fx.ops.chunks import packed_pieces
from facto_fx.shapes import SUPPORTED_BITS


def _shifts(bits: int, device: torch.device) -> Tensor:
    return torch.arange(0, 8, bits, dtype=torch.uint8, device=device)


def pack_bits(codes: Tensor, bits: int, channels_last: bool = False) -> Tensor:
    """Pack `codes` (bool or uint8 values < 2**bits) into a 1-D uint8 tensor.

    channels_last packs the N×C×H×W `codes` in (N, H, W, C) order.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}; got {bits}")
    if channels_last:
        codes = codes.permute(0, 2, 3, 1)
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat
    if sys.byteorder == "little":
        return _pack_by_multiply(flat, bits)
    per_byte = 8 // bits
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, per_byte) << _shifts(bits, flat.device)
    return groups.sum(dim=1, dtype=torch.uint8)


def pack_pieces(flat: Tensor, bits: int, codes_of: Callable[[Tensor], Tensor]) -> Tensor:
    """pack_bits(codes_of(flat), bits) for a 1-D `flat`, computed and packed a piece at a time on the
    CPU (ops/chunks.py): the codes and the packing's integer words never exist at full size (at
    1 bit they took four bytes an element beside the map)."""
    per_byte = 8 // bits
    packed = torch.empty(-(-flat.numel() // per_byte), dtype=torch.uint8, device=flat.device)
    for codes, elements in packed_pieces(flat.numel(), per_byte, flat):
        packed[codes] = pack_bits(codes_of(flat[elements]), bits)
    return packed


# A group of 8 / bits codes, one per byte, read as one little-endian integer v of that many bytes:
# v · _GATHER[bits] (wrapping, as torch's integer products do) holds the group's packed byte in its
# top eight bits. Code i sits at bit 8i and lands on bit (top byte) + bits·i; the other products
# land above the word or sum to less than its top byte, so no carry reaches it.
_GATHER = {
    1: (torch.int64, 0x0102040810204080),
    2: (torch.int32, (1 << 24) + (1 << 18) + (1 << 12) + (1 << 6)),
    4: (torch.int16, (1 << 8) + (1 << 4)),
}


def _pack_by_multiply(flat: Tensor, bits: int) -> Tensor:
    """Packing as one multiply and one shift per byte of output: a dozen to twenty times faster
    than shift-and-sum over groups."""
    word, gather = _GATHER[bits]
    per_byte = 8 // bits
    pad = (-flat.numel()) % per_byte
    if pad or flat.storage_offset() % per_byte:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return ((flat.view(word) * gather) >> (8 * per_byte - 8)).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of `pack_bits`: a 1-D uint8 tensor of the first `numel` codes."""
    if bits == 8:
        return packed[:numel]
    if bits == 1 and sys.byteorder == "little":
        return unpack_flags(packed)[:numel].clamp_(max=1)
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(1) >> _shifts(bits, packed.device)) & mask
    return codes.reshape(-1)[:numel]


# Byte b times _SPREAD is b in each of eight bytes; & _PICK keeps bit i in byte i (as int64, wrapping).
_SPREAD = 0x0101010101010101
_PICK = 0x8040201008040201 - (1 << 64)


def unpack_flags(packed: Tensor) -> Tensor:
    """1-bit codes as uint8 flags, nonzero where the code is 1 (code i of a byte comes back as
    its bit i, 2**i): one multiply and one mask per packed byte, five times faster than shifts.
    Consumers that only test for nonzero skip the normalisation to 0 / 1. Little-endian only."""
    return ((packed.to(torch.int64) * _SPREAD) & _PICK).view(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, shape: torch.Size, channels_last: bool = False) -> Tensor:
    """Inverse of `pack_bits(codes, bits, channels_last)`: the codes as a tensor of `shape`.

    channels_last codes come back as a channels_last view (no copy).
    """
    return _shaped(unpack_bits(packed, bits, shape.numel()), shape, channels_last)


def mask_flags(packed: Tensor, numel: int) -> Tensor:
    """The first `numel` bits of a packed 1-bit mask as 1-D uint8, nonzero where set (not always 1)."""
    if sys.byteorder != "little":
        return unpack_bits(packed, 1, numel)
    return unpack_flags(packed)[:numel]


def in_code_order(t: Tensor, channels_last: bool) -> Tensor:
    """t's elements as a 1-D tensor in the order codes of an N×C×H×W map are packed (see the module's
    docstring): a view of a tensor already laid out that way, else of a copy that is."""
    if not channels_last:
        return t.contiguous().view(-1)
    return t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1)


def empty_in_code_order(like: Tensor, channels_last: bool) -> tuple[Tensor, Tensor]:
    """An uninitialised tensor shaped like `like`, laid out as codes packed `channels_last` are, and
    its 1-D view in that order (write the view, return the tensor)."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty_like(like, memory_format=layout)
    return out, in_code_order(out, channels_last)


def _shaped(codes: Tensor, shape: torch.Size, channels_last: bool) -> Tensor:
    if channels_last:
        n, c, h, w = shape
        return codes.view(n, h, w, c).permute(0, 3, 1, 2)
    return codes.view(shape)
