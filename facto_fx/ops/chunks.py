"""Chains of elementwise ops on the CPU, run in cache-sized pieces.

A chain of PyTorch elementwise ops over a large map writes every intermediate to fresh memory: on a
CPU each op then streams the whole map through main memory, and each fresh allocation pays its page
faults. Run piece by piece over rows of about 2^18 elements into buffers reused across pieces, the
intermediates stay in cache: the quantizer's chain on a 5M-element map ran 3x faster. On other
devices (one kernel launch per op and piece) one piece is the whole map.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

CPU_PIECE_ELEMENTS = 1 << 18
# Pieces of a map handed to oneDNN one call each (a fixed-rate conv's weight gradient): a quarter of the
# map, at least this many elements. Each call has its overhead (cache-sized pieces ran 1.2-2.7 times
# slower on efficientnet_b0's depthwise maps); a quarter is what a piece adds to a large map's peak.
KERNEL_PIECE_ELEMENTS = 1 << 20


def row_pieces(rows: int, row_size: int, device: torch.device, piece: int = CPU_PIECE_ELEMENTS) -> Iterator[slice]:
    """Slices of `rows` rows of `row_size` elements each, about `piece` elements a piece on the CPU,
    all rows in one piece elsewhere."""
    step = max(1, piece // max(1, row_size)) if device.type == "cpu" else max(1, rows)
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def pieces_like(rows: int, row_size: int, like: Tensor, piece: int = CPU_PIECE_ELEMENTS) -> Iterator[slice]:
    """row_pieces for work on `like`: one piece for a fake tensor too (torch.compile tracing a
    backward fuses the chain itself, and pieces would only lengthen its graph)."""
    if is_fake(like):
        yield slice(0, rows)
        return
    yield from row_pieces(rows, row_size, like.device, piece)


def packed_pieces(numel: int, per_byte: int, like: Tensor) -> Iterator[tuple[slice, slice]]:
    """(packed bytes, their codes) slices over `numel` codes packed `per_byte` to a byte, pieced as
    `pieces_like` pieces them."""
    for packed in pieces_like(-(-numel // per_byte), per_byte, like):
        yield packed, slice(packed.start * per_byte, min(packed.stop * per_byte, numel))


def quarter_pieces(rows: int, row_size: int, like: Tensor) -> Iterator[slice]:
    """Pieces of rows for a kernel call each (see KERNEL_PIECE_ELEMENTS), pieced as `pieces_like`."""
    piece = max(KERNEL_PIECE_ELEMENTS, -(-rows * row_size // 4))
    yield from pieces_like(rows, row_size, like, piece)
