"""Shape and layout facts shared by the ops (`facto_fx/ops`) and their kernels (`facto_fx/triton_ops`).

A leaf: it imports only torch, so both layers read one definition of each rule and neither
imports the other for it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SUPPORTED_BITS = (1, 2, 4, 8)


def pair(value: int | tuple[int, ...] | list[int]) -> list[int]:
    """An int or a 2-sequence of a 2-D op's size argument, as the list a custom-op schema takes."""
    return [value, value] if isinstance(value, int) else list(value)


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pool_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """F.max_pool2d's output size, ceil mode's rule included (a last window must start inside)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def pooled_size(size: int, k: int) -> int:
    """Size after a ceil-mode k-pool: a window hanging over the edge still counts."""
    return -(-size // k)


def code_bits(num_codes: int) -> int:
    """Smallest supported width that holds `num_codes` distinct values."""
    needed = max(1, math.ceil(math.log2(max(num_codes, 2))))
    for bits in SUPPORTED_BITS:
        if bits >= needed:
            return bits
    raise ValueError(f"{num_codes} codes do not fit in 8 bits")


def packed_numel(numel: int, bits: int) -> int:
    return math.ceil(numel * bits / 8)


def is_channels_last(x: Tensor) -> bool:
    """Whether `x` is a channels_last 4-D map, so its codes go in (N, H, W, C) order.

    A map that is contiguous too (C = 1 or H·W = 1) has one order for both: it counts as contiguous.
    """
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
