"""Pack small integer codes (1, 2, 4 or 8 bits each) into uint8 bytes, and back.

ReLU and dropout masks are 1-bit codes; max-pool argmax codes use 2 or 4 bits. Packing is along
the flattened tensor, so any shape works; the byte count is ceil(numel * bits / 8).

Codes go in the memory order of the map they describe: (N, H, W, C) for a channels_last map, the
logical order for any other tensor. A channels_last map's codes then flatten without a copy, and
a kernel that walks the map in memory order packs whole bytes of neighbouring elements.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

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
    if bits == 1 and sys.byteorder == "little":
        return _pack_bytes_of_bits(flat)
    per_byte = 8 // bits
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, per_byte) << _shifts(bits, flat.device)
    return groups.sum(dim=1, dtype=torch.uint8)


# Byte i of a little-endian int64 of eight 0/1 bytes, times this, lands on bit 56 + i.
_GATHER_BITS = 0x0102040810204080


def _pack_bytes_of_bits(flat: Tensor) -> Tensor:
    """1-bit packing as one multiply per eight codes (a dozen times faster than shift-and-sum).

    The eight 0/1 bytes of a group are read as one int64 v; v · _GATHER_BITS (wrapping, as int64
    products do in torch) holds the group's byte in its top eight bits.
    """
    pad = (-flat.numel()) % 8
    if pad or flat.storage_offset() % 8:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return ((flat.view(torch.int64) * _GATHER_BITS) >> 56).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of `pack_bits`: a 1-D uint8 tensor of the first `numel` codes."""
    if bits == 8:
        return packed[:numel]
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(1) >> _shifts(bits, packed.device)) & mask
    return codes.reshape(-1)[:numel]


def unpack_codes(packed: Tensor, bits: int, shape: torch.Size, channels_last: bool = False) -> Tensor:
    """Inverse of `pack_bits(codes, bits, channels_last)`: the codes as a tensor of `shape`.

    channels_last codes come back as a channels_last view (no copy).
    """
    codes = unpack_bits(packed, bits, shape.numel())
    if channels_last:
        n, c, h, w = shape
        return codes.view(n, h, w, c).permute(0, 3, 1, 2)
    return codes.view(shape)
