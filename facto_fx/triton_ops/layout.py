"""The two layouts the kernels index: NCHW, and channels_last (NHWC in memory).

A kernel takes CHANNELS_LAST as a constexpr and goes between an element's (n, c, h, w) and its
memory offset with `offset` and `position`, so it walks a channels_last map in memory order
instead of reading a copy of it. Tensors in neither layout are copied to NCHW first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from facto_fx.shapes import is_channels_last


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def kernel_layout(x: Tensor) -> tuple[Tensor, bool]:
    """(x as a kernel indexes it, whether that is channels_last): a copy only if x is in neither layout."""
    if is_channels_last(x):
        return x, True
    return x.contiguous(), False


def in_layout(t: Tensor, channels_last: bool) -> Tensor:
    """`t` in the given layout: itself when it already is (the usual case), else a copy."""
    return t.contiguous(memory_format=memory_format(channels_last))


@triton.jit
def offset(n, c, h, w, C, H, W, CHANNELS_LAST: tl.constexpr):
    """Memory offset of element (n, c, h, w) of an N×C×H×W map."""
    if CHANNELS_LAST:
        result = ((n * H + h) * W + w) * C + c
    else:
        result = ((n * C + c) * H + h) * W + w
    return result


@triton.jit
def position(offsets, C, H, W, CHANNELS_LAST: tl.constexpr):
    """(n, c, h, w) of the elements at memory `offsets` of an N×C×H×W map: the inverse of `offset`."""
    if CHANNELS_LAST:
        c = offsets % C
        w = (offsets // C) % W
        h = (offsets // (C * W)) % H
        n = offsets // (C * W * H)
    else:
        w = offsets % W
        h = (offsets // W) % H
        c = (offsets // (W * H)) % C
        n = offsets // (W * H * C)
    return n, c, h, w
