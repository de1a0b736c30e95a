"""Batch-norm with frozen running statistics (docs/design.md §1): γ and β train, the statistics
do not, so the saved input can be pooled (lossy_kernel > 1) or kept whole (lossy_kernel = 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from facto_fx import ops
from facto_fx.dtypes import parse_dtype
from facto_fx.layers import FactoBatchNorm
from facto_fx.matches import BATCH_NORM, Match, call_args
from facto_fx.methods.base import Method, MethodConfig, RewriteSite, register_method


@dataclass(frozen=True)
class FrozenBatchNorm(MethodConfig):
    """Frozen statistics; the saved input mean-pooled by `lossy_kernel` (1: kept whole)."""

    label = "frozen"

    lossy_kernel: int = 1
    storage_dtype: torch.dtype | str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.lossy_kernel, bool) or not isinstance(self.lossy_kernel, int) or self.lossy_kernel < 1:
            raise ValueError(f"lossy_kernel must be an integer >= 1 (1 disables pooling); got {self.lossy_kernel!r}")
        object.__setattr__(self, "storage_dtype", parse_dtype(self.storage_dtype))

    @property
    def saves_memory(self) -> bool:
        return self.lossy_kernel > 1 or self.storage_dtype is not None


def rewrite_batch_norm(
    site: RewriteSite, match: Match, lossy_kernel: int, storage_dtype: torch.dtype | None,
    batch_statistics: bool = False, bits: int | None = None,
) -> None:
    """Rewrite a batch-norm module or call into frozen-statistics batch-norm, or into batch-norm on
    batch statistics in training; both save x̂ pooled (in `bits`-bit codes, given them)."""
    if match.module is not None:
        if isinstance(match.module, nn.BatchNorm1d | nn.BatchNorm3d):
            lossy_kernel = 1  # its maps are never N×C×H×W, the only ones the op pools: say so
        site.use_layer(match, FactoBatchNorm(match.module, lossy_kernel, storage_dtype, batch_statistics, bits))
        return
    args = call_args(match.node)
    kept = {"lossy_kernel": lossy_kernel, "storage_dtype": storage_dtype, "bits": bits}
    if batch_statistics:
        site.use_function(
            match.node, ops.batch_norm_in_mode,
            tuple(args[name] for name in ("input", "running_mean", "running_var", "weight", "bias", "training",
                                          "momentum", "eps")),
            kept,
        )
        return
    site.use_function(
        match.node, ops.batch_norm,
        tuple(args[name] for name in ("input", "running_mean", "running_var", "weight", "bias")),
        {"eps": args["eps"], **kept},
    )


@register_method(FrozenBatchNorm)
class Frozen(Method):
    kinds = frozenset({BATCH_NORM})

    def rewrite(self, site: RewriteSite, match: Match, method: FrozenBatchNorm) -> None:
        rewrite_batch_norm(site, match, method.lossy_kernel, method.storage_dtype)
