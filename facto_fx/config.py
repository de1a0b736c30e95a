"""FactoConfig: every knob of the pass in one validated dataclass."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from facto_fx.methods import (
    FactoLowRank,
    FewBitActivation,
    FixedRate,
    Last,
    MethodConfig,
    RowStrips,
    method_handler,
)
from facto_fx.triton_ops.dispatch import Kernels, check_mode

LayerFilter = Callable[[str, "nn.Module | None"], bool]
MethodChoices = Mapping["str | Last | LayerFilter", "MethodConfig | None"]
BATCH_NORM_MODES = ("freeze", "lossy", "train")


@dataclass(frozen=True)
class FactoConfig:
    """How `facto_fx.compile` rewrites a model.

    inr: internal node ratio, C_R = round(inr * C_I) (paper §3.1.1), in (0, 1].
    direction: how Facto draws D, "gaussian" (the paper), "orthonormal", or "gradient" (from a weight
        gradient at each merge; attach needs a probe) (FactoLowRank).
    scale: the norm of drawn D's rows, "unbiased" (an SGD step on M is in expectation the full-rank
        step) or "paper" (eq. 13) (FactoLowRank).
    lossy_kernel: k of the mean-pool that compresses saved maps (paper §3.3); 1 = no pooling.
    apply_ratio: share of conv / scale / batch-norm layers to compress, counted from the input.
    storage_dtype: dtype of compressed maps; None keeps the activation dtype.
    batch_norm: "lossy" (the default) keeps batch statistics (the forward and the running
        statistics as torch's, so the model computes what it did) and saves x̂ pooled, its
        backward reading x̂ from that copy; "freeze" rewrites batch-norm into a frozen-statistics
        affine (faster on the CPU, the same pooled x̂). On a task that is not saturated frozen
        statistics cost accuracy, the more the further Facto moves the weights, and lossy did not
        (benchmarks/accuracy.py); they also diverge at an undropped learning rate. Under "lossy",
        batch-norm beyond apply_ratio stays torch's, and so does a module the trace keeps whole
        (a batch-norm subclass with momentum=None, whose averaging factor is its batch count),
        with the reason in the report; the batch count of one the trace enters
        (timm's BatchNormAct2d) is kept by the graph. "train" leaves every batch-norm as torch's,
        its input saved whole.
    include / exclude / layer_filter: force layers in or out by qualified name or by a function
        ``(name, module_or_None) -> bool`` returning False to exclude.
    leaf_modules: qualified names the tracer must not enter; they are kept as one call, dense.
    strict: raise FactoTraceError when a sub-module cannot be traced, instead of keeping it as
        one opaque (dense) call and listing it in the report.
    binarize_activations: store ReLU / max-pool / dropout masks as packed bits, and the derivative
        of ReLU6, hardtanh, leaky ReLU and hardsigmoid in 1 bit (exact; FewBitActivation).
    activation_bits: bits per element of the derivative SiLU, GELU, Hardswish, Mish and ELU keep for
        backward instead of their input (FewBitActivation: 1, 2, 4 or 8; the forward is exact, the
        gradient through the activation approximate); None leaves them as they are. Sigmoid and tanh
        keep their output, which the next layer keeps anyway: they are coded only by name.
    store_bits: bits per element of the fixed-rate store (FixedRate: 2, 4 or 8, stochastically
        rounded, unbiased) for what no other form covers: the input of a grouped or depthwise conv
        (Facto refuses them), the factors of a product of feature maps (squeeze-excite), the x̂ of a
        layer or group norm; and for the pooled x̂ of Facto's batch-norm (FactoLowRank.pooled_bits);
        4 by default (efficientnet_b0, mobilenet_v3_large and convnext_atto,
        3 seeds on digits and mnist5k: within 0.56 points of vanilla, and of Facto without the new
        forms, benchmarks/forms_accuracy.py); None leaves them as they are.
    seed: seeds the random direction matrices D, per layer and per redraw.
    methods: per-layer methods, {name, glob pattern, Last(n) or filter function: MethodConfig or
        None}, e.g. {"layer4.*": FactoLowRank(inr=0.5), "fc": None}. An exact layer name beats a pattern, Last(n)
        or filter (tried in the mapping's order), which beats apply_ratio; None leaves it dense.
    fallback: a method for every layer the plan would otherwise leave as it is (apply_ratio's dense
        layers, ops no Facto operator covers), where it takes that kind of layer; layers left dense
        by name, pattern or filter, and layers that cannot be rewritten at all, stay dense.
        ErrorBounded here covers a model end to end (facto_fx.presets.facto_error_bounded).
    row_strips: RowStrips(strips, mode) runs the chain of spatially local layers from the input
        (conv, ReLU, pooling, frozen batch-norm, residual adds; Facto's layers included) one
        horizontal strip at a time, lossless, to lower a step's peak memory (LR-CNN).
    kernels: "auto" runs the Triton kernels on CUDA tensors and PyTorch elsewhere; "torch" always
        PyTorch; "triton" always Triton, failing with a RuntimeError where it cannot run. "auto"
        leaves the choice to an enclosing `facto_fx.use_kernels(...)` block, if any.
    """

    inr: float = FactoLowRank.inr  # each default is written once: Facto's own fields are FactoLowRank's
    lossy_kernel: int = FactoLowRank.lossy_kernel
    apply_ratio: float = 0.6
    storage_dtype: torch.dtype | str | None = None
    batch_norm: Literal["freeze", "lossy", "train"] = "lossy"
    include: Sequence[str] = field(default_factory=tuple)
    exclude: Sequence[str] = field(default_factory=tuple)
    layer_filter: LayerFilter | None = None
    leaf_modules: Sequence[str] = field(default_factory=tuple)
    strict: bool = False
    binarize_activations: bool = True
    activation_bits: int | None = 2
    store_bits: int | None = 4
    seed: int = 0
    kernels: Kernels = "auto"
    methods: MethodChoices = field(default_factory=dict, hash=False)
    fallback: MethodConfig | None = None
    direction: Literal["gaussian", "orthonormal", "gradient"] = FactoLowRank.direction
    scale: Literal["unbiased", "paper"] = FactoLowRank.scale
    row_strips: RowStrips | None = None

    def __post_init__(self) -> None:
        if self.store_bits is not None:
            FixedRate(self.store_bits)  # validates it before low_rank() passes it on
        low_rank = self.low_rank()  # validates inr, lossy_kernel, storage_dtype, direction and scale
        object.__setattr__(self, "storage_dtype", low_rank.storage_dtype)
        if isinstance(self.apply_ratio, bool) or not isinstance(self.apply_ratio, (int, float)) or not (
            0.0 <= self.apply_ratio <= 1.0
        ):
            raise ValueError(f"apply_ratio must be a number in [0, 1]; got {self.apply_ratio!r}")
        if self.batch_norm not in BATCH_NORM_MODES:
            raise ValueError(f"batch_norm must be one of {', '.join(map(repr, BATCH_NORM_MODES))}; "
                             f"got {self.batch_norm!r}")
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
        if self.activation_bits is not None:
            FewBitActivation(self.activation_bits)  # validates them
        if not isinstance(self.methods, Mapping):
            raise ValueError(f"methods must map layer names, patterns or filters to methods; got {self.methods!r}")
        for key, method in self.methods.items():
            if not (isinstance(key, (str, Last)) or callable(key)):
                raise ValueError(
                    f"methods keys must be layer names, glob patterns, Last(n) or filter functions; got {key!r}"
                )
            if method is not None:
                if not isinstance(method, MethodConfig):
                    raise ValueError(
                        f"methods[{key!r}] must be a method config (e.g. FactoLowRank(...)) or None; got {method!r}"
                    )
                method_handler(method)  # registered?
        overlap = {k for k in self.methods if isinstance(k, str)} & (set(self.include) | set(self.exclude))
        if overlap:
            raise ValueError(f"layers {sorted(overlap)} are named both in methods and in include / exclude")
        object.__setattr__(self, "methods", dict(self.methods))
        if self.fallback is not None:
            if not isinstance(self.fallback, MethodConfig):
                raise ValueError(f"fallback must be a method config (ErrorBounded(...)) or None; got {self.fallback!r}")
            method_handler(self.fallback)

        if self.row_strips is not None and not isinstance(self.row_strips, RowStrips):
            raise ValueError(f"row_strips must be RowStrips(strips=..., mode=...) or None; got {self.row_strips!r}")

    def low_rank(self) -> FactoLowRank:
        """The Facto method apply_ratio and include give a layer."""
        return FactoLowRank(self.inr, self.lossy_kernel, self.storage_dtype, self.direction,
                            batch_statistics=self.batch_norm == "lossy", scale=self.scale,
                            pooled_bits=self.store_bits)
