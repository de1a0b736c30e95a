"""FactoConfig: every knob of the pass in one validated dataclass."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from facto_fx.triton_ops.dispatch import Kernels, check_mode

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

LayerFilter = Callable[[str, "nn.Module | None"], bool]


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


@dataclass(frozen=True)
class FactoConfig:
    """How `facto_fx.compile` rewrites a model.

    inr: internal node ratio, C_R = round(inr * C_I) (paper §3.1.1), in (0, 1].
    lossy_kernel: k of the mean-pool that compresses saved maps (paper §3.3); 1 = no pooling.
    apply_ratio: share of conv / scale / batch-norm layers to compress, counted from the input.
    storage_dtype: dtype of compressed maps; None keeps the activation dtype.
    batch_norm: "freeze" rewrites batch-norm into a frozen-statistics affine; "train" leaves it
        in training mode, unrewritten, for models that need batch statistics.
    include / exclude / layer_filter: force layers in or out by qualified name or by a function
        ``(name, module_or_None) -> bool`` returning False to exclude.
    leaf_modules: qualified names the tracer must not enter; they are kept as one call, dense.
    strict: raise FactoTraceError when a sub-module cannot be traced, instead of keeping it as
        one opaque (dense) call and listing it in the report.
    binarize_activations: store ReLU / max-pool / dropout masks as packed bits.
    seed: seeds the random direction matrices D, per layer and per redraw.
    kernels: "auto" runs the Triton kernels on CUDA tensors and PyTorch elsewhere; "torch" always
        PyTorch; "triton" always Triton, failing with a RuntimeError where it cannot run. "auto"
        leaves the choice to an enclosing `facto_fx.use_kernels(...)` block, if any.
    """

    inr: float = 0.3
    lossy_kernel: int = 2
    apply_ratio: float = 0.6
    storage_dtype: torch.dtype | str | None = None
    batch_norm: Literal["freeze", "train"] = "freeze"
    include: Sequence[str] = field(default_factory=tuple)
    exclude: Sequence[str] = field(default_factory=tuple)
    layer_filter: LayerFilter | None = None
    leaf_modules: Sequence[str] = field(default_factory=tuple)
    strict: bool = False
    binarize_activations: bool = True
    seed: int = 0
    kernels: Kernels = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.inr, bool) or not isinstance(self.inr, (int, float)) or not (
            0.0 < self.inr <= 1.0
        ) or math.isnan(self.inr):
            raise ValueError(f"inr must be a number in (0, 1] (the paper uses 0.2-0.4); got {self.inr!r}")
        if isinstance(self.lossy_kernel, bool) or not isinstance(self.lossy_kernel, int) or (
            self.lossy_kernel < 1
        ):
            raise ValueError(
                f"lossy_kernel must be an integer >= 1 (1 disables pooling, the paper uses 2); "
                f"got {self.lossy_kernel!r}"
            )
        if isinstance(self.apply_ratio, bool) or not isinstance(self.apply_ratio, (int, float)) or not (
            0.0 <= self.apply_ratio <= 1.0
        ):
            raise ValueError(f"apply_ratio must be a number in [0, 1]; got {self.apply_ratio!r}")
        object.__setattr__(self, "storage_dtype", parse_dtype(self.storage_dtype))
        if self.batch_norm not in ("freeze", "train"):
            raise ValueError(f"batch_norm must be 'freeze' or 'train'; got {self.batch_norm!r}")
        for name in ("include", "exclude", "leaf_modules"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name} must be a sequence of qualified layer names; got {value!r}")
            object.__setattr__(self, name, tuple(value))
        overlap = set(self.include) & set(self.exclude)
        if overlap:
            raise ValueError(f"layers {sorted(overlap)} are in both include and exclude")
        if self.layer_filter is not None and not callable(self.layer_filter):
            raise ValueError("layer_filter must be callable as layer_filter(name, module) -> bool")
        if not isinstance(self.strict, bool):
            raise ValueError(f"strict must be True or False; got {self.strict!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int; got {self.seed!r}")
        check_mode(self.kernels)

    def rank(self, features: int) -> int:
        """Internal rank for a layer with `features` input channels / nodes (at least 1)."""
        return max(1, min(features, round(self.inr * features)))
