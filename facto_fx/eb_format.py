"""The error-bounded codec's format facts, shared by its PyTorch reference (ops/eb_codec.py) and
its Triton kernels (triton_ops/eb_codec.py): block size, code range, the Codes container, the
quantisation step and the order a tensor is read in. The format itself is described in
ops/eb_codec.py.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from facto_fx.shapes import is_channels_last

BLOCK = 32
MAX_CODE = 2**29  # |q| up to this keeps every residual (a difference of two codes, ≤ 2**30) inside int32
CODEC_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class Codes(NamedTuple):
    """One compressed tensor: what autograd keeps in place of it."""

    widths: Tensor  # uint8 (nblocks,): bit length of each block's largest residual
    words: Tensor  # int32: per nonzero block, its sign mask then its bit planes
    outlier_index: Tensor  # int64: memory-order flat positions stored exactly
    outlier_value: Tensor  # x's dtype: the exact values at those positions

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self)


def step_of(eb: float) -> float:
    """The quantisation step 2eb as the fp32 value both sides multiply by."""
    return float(torch.tensor(2 * eb, dtype=torch.float32))


def check_bound(eb: float) -> float:
    if isinstance(eb, bool) or not isinstance(eb, (int, float)) or not (math.isfinite(eb) and eb > 0):
        raise ValueError(f"eb (the absolute error bound) must be a finite number > 0; got {eb!r}")
    step = step_of(eb)
    if not (math.isfinite(step) and step >= torch.finfo(torch.float32).tiny):
        raise ValueError(f"eb={eb!r} has no normal fp32 quantisation step 2eb; use 1e-37 <= eb <= 1e38")
    return float(eb)


def memory_order(x: Tensor) -> Tensor:
    """x's elements as a flat view in memory order (a copy only for layouts with gaps or overlaps)."""
    if not (x.is_contiguous() or is_channels_last(x)):
        x = x.contiguous()
    return x.as_strided((x.numel(),), (1,))
