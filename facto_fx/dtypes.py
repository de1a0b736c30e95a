"""Dtype names users may write ("bf16", "fp16", ...), parsed in one place."""

from __future__ import annotations

import torch

_DTYPE_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp64": torch.float64,
    "float64": torch.float64,
}


def parse_dtype(value: torch.dtype | str | None, argument: str = "storage_dtype") -> torch.dtype | None:
    """Accept a torch.dtype or a short name ("bf16", "fp16", ...); None keeps the activation dtype."""
    if value is None or isinstance(value, torch.dtype) and value in _DTYPE_NAMES.values():
        return value
    if isinstance(value, str) and value.lower() in _DTYPE_NAMES:
        return _DTYPE_NAMES[value.lower()]
    raise ValueError(
        f"{argument} must be None (keep the activation dtype), a floating torch.dtype or one of "
        f"{sorted(_DTYPE_NAMES)}; got {value!r}"
    )
