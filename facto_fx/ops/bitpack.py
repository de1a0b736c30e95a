"""Pack small integer codes (1, 2, 4 or 8 bits each) into uint8 bytes, and back.

ReLU and dropout masks are 1-bit codes; max-pool argmax codes use 2 or 4 bits. Packing is along
the flattened tensor, so any shape works; the byte count is ceil(numel * bits / 8).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SUPPORTED_BITS = (1, 2, 4, 8)


def code_bits(num_codes: int) -> int:
    """Smallest supported width that holds `num_codes` distinct values."""
    needed = max(1, math.ceil(math.log2(max(num_codes, 2))))
    for bits in SUPPORTED_BITS:
        if bits >= needed:
            return bits
    raise ValueError(f"{num_codes} codes do not fit in 8 bits")


def packed_numel(numel: int, bits: int) -> int:
    return math.ceil(numel * bits / 8)


def _shifts(bits: int, device: torch.device) -> Tensor:
    return torch.arange(0, 8, bits, dtype=torch.uint8, device=device)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack `codes` (bool or uint8 values < 2**bits) into a 1-D uint8 tensor."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}; got {bits}")
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat
    per_byte = 8 // bits
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, per_byte) << _shifts(bits, flat.device)
    return groups.sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of `pack_bits`: a 1-D uint8 tensor of the first `numel` codes."""
    if bits == 8:
        return packed[:numel]
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(1) >> _shifts(bits, packed.device)) & mask
    return codes.reshape(-1)[:numel]
