"""HOSVD / SVD activation compression (papers/hosvd-activation-compression.txt, docs/design.md §6).

A conv or linear layer trains its full weight and computes grad_X exactly; for grad_W it saves a
truncated decomposition of its input instead of the input, each rank the smallest that keeps ε of
the mode's energy (facto_fx.ops.hosvd). HOSVD decomposes every mode, SVD the batch mode only.
The paper's setting is fine-tuning the last layers: `methods={facto_fx.Last(4): HOSVD(0.8)}`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, fx, nn

from facto_fx import ops
from facto_fx.layers import HOSVDConv2d, HOSVDLinear
from facto_fx.matches import CONV, LINEAR, Match, call_args
from facto_fx.methods.base import Last, Method, MethodConfig, PlanContext, RewriteSite, register_method
from facto_fx.ops.hosvd import SCALE_DTYPE


@dataclass(frozen=True)
class HOSVD(MethodConfig):
    """Save a truncated HOSVD of the layer's input; eps in (0, 1] is the energy kept per mode
    (1: lossless, the paper uses 0.8 and 0.9)."""

    label = "hosvd"
    mode: ClassVar[str] = "hosvd"

    eps: float = 0.8

    def __post_init__(self) -> None:
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0.0 < self.eps <= 1.0:
            raise ValueError(f"eps must be a number in (0, 1] (the energy kept per mode; 0.8 or 0.9); got {self.eps!r}")


@dataclass(frozen=True)
class SVD(HOSVD):
    """Save a truncated SVD of the input's batch-mode unfolding (B × C·H·W); eps as in HOSVD."""

    label = "svd"
    mode: ClassVar[str] = "svd"


def _worst_case_elements(shape: tuple[int, ...], mode: str, conv: bool) -> int:
    """Elements of the codes in x's dtype at full rank (all but the scale): what the analytic report can promise
    before data exist. A mode's rank is at most its size and the product of the other modes' sizes (its
    unfolding's smaller side): a batch of 2 keeps at most 2 channel directions, not 512."""
    dims = list(shape) if conv else [math.prod(shape[:-1]), shape[-1]]
    total = math.prod(dims)
    ranks = [min(d, total // d) for d in dims]
    if mode == "svd":
        return dims[0] * ranks[0] + ranks[0] * (total // dims[0])
    return math.prod(ranks) + sum(d * r for d, r in zip(dims, ranks, strict=True))


class _Decomposed(Method):
    kinds = frozenset({CONV, LINEAR})
    modules = (HOSVDConv2d, HOSVDLinear)
    analytic_note = "full-rank worst case: the ranks depend on the data (a real run reports them)"

    def refuses(self, match: Match, method: MethodConfig, context: PlanContext) -> str | None:
        module = match.module
        if module is None:
            return None
        if not module.weight.requires_grad:
            return "its weight is frozen: there is no weight gradient whose input to compress"
        if getattr(module, "padding_mode", "zeros") != "zeros":
            return f"padding_mode='{module.padding_mode}' is not supported; left dense"
        return None

    def rewrite(self, site: RewriteSite, match: Match, method: HOSVD) -> None:
        module = match.module
        if module is not None:
            layer = (HOSVDConv2d.from_conv(module, method.eps, method.mode) if match.kind == CONV
                     else HOSVDLinear.from_linear(module, method.eps, method.mode))
        else:
            args = call_args(match.node)
            weight, bias = site.tensor(args["weight"]), site.tensor(args["bias"])
            if match.kind == CONV:
                layer = HOSVDConv2d(weight, bias, args["stride"], args["padding"], args["dilation"], args["groups"],
                                    method.eps, method.mode)
            else:
                layer = HOSVDLinear(weight, bias, method.eps, method.mode)
        site.use_layer(match, layer)

    def describe(self, layer: nn.Module, x: Tensor) -> str | None:
        x = x if x.dim() == 4 else x.reshape(-1, x.shape[-1])
        modes = ops.rank_report(x, layer.eps, layer.mode)
        ranks = "x".join(str(m.rank) for m in modes)
        return f"{layer.mode} eps {layer.eps}: ranks {ranks} of {'x'.join(map(str, x.shape))}"

    def saved_bytes(self, method: HOSVD, node: fx.Node, args: tuple, kwargs: dict) -> int | None:
        """The full-rank worst case (ranks depend on the data; real runs report what was kept), and the scale."""
        x = args[0]
        return _worst_case_elements(tuple(x.shape), method.mode, x.dim() == 4) * x.element_size() + SCALE_DTYPE.itemsize


register_method(HOSVD)(_Decomposed)
register_method(SVD)(_Decomposed)

DECOMPOSITIONS = {"hosvd": HOSVD, "svd": SVD}


def on_last_layers(name: str, eps: float, last: int) -> dict:
    """`methods=` for the command line's `--method hosvd|svd --eps E --last N`."""
    if name not in DECOMPOSITIONS:
        raise ValueError(f"method must be one of {sorted(DECOMPOSITIONS)} here; got {name!r}")
    return {Last(last): DECOMPOSITIONS[name](eps)}


@dataclass
class RankRow:
    """One HOSVD / SVD layer on one batch: its input's shape and, per eps, the ranks kept."""

    layer: str
    mode: str
    shape: tuple[int, ...]
    ranks: dict[float, tuple[int, ...]]
    kept: dict[float, tuple[float, ...]]


@dataclass
class RankTable:
    """What each decomposed layer keeps at several eps: read it to pick eps."""

    rows: list[RankRow]

    def __str__(self) -> str:
        lines = []
        for row in self.rows:
            lines.append(f"{row.layer} ({row.mode}, input {'x'.join(map(str, row.shape))})")
            for eps, ranks in row.ranks.items():
                kept = ", ".join(f"{k:.3f}" for k in row.kept[eps])
                lines.append(f"  eps {eps:<5g} ranks {'x'.join(map(str, ranks)):<16} energy kept per mode {kept}")
        return "\n".join(lines)


@torch.no_grad()
def rank_table(fmodel: nn.Module, *inputs: Tensor, eps: tuple[float, ...] = (0.8, 0.9, 0.95, 0.99)) -> RankTable:
    """Run `fmodel` on `inputs` and tabulate, for every HOSVD / SVD layer, the ranks and kept energy
    its input would get at each eps (and at the layer's own)."""
    seen: dict[str, tuple[nn.Module, Tensor]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, _output: Tensor) -> None:
            seen.setdefault(name, (module, args[0]))

        return hook

    handles = [
        layer.register_forward_hook(record(name))
        for name, layer in fmodel.named_modules() if isinstance(layer, (HOSVDConv2d, HOSVDLinear))
    ]
    try:
        fmodel(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    for name, (layer, x) in seen.items():
        levels = sorted({*eps, layer.eps})
        x = x if x.dim() == 4 else x.reshape(-1, x.shape[-1])
        reports = {e: ops.rank_report(x, e, layer.mode) for e in levels}
        rows.append(RankRow(name, layer.mode, tuple(x.shape), {e: tuple(m.rank for m in r) for e, r in reports.items()},
                            {e: tuple(m.kept for m in r) for e, r in reports.items()}))
    return RankTable(rows)
