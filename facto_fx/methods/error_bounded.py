"""Error-bounded lossy compression of saved activations (COMET, shared/papers/
error-bounded-lossy-compression.txt; docs/design.md §6).

The op is kept exactly as it is and called through `ops.compressed_call`: its output is exact, and
the feature maps it saves for backward are held as SZ-style codes within eb of every element
(ops/eb_codec.py). It takes every op that saves a feature map, including those no Facto operator
covers: SiLU / GELU / Hardswish / sigmoid, layer and group norm, batch-norm with batch statistics,
products of feature maps (squeeze-excite), grouped and depthwise convs. On a conv or linear layer
only the input kept for grad_W is compressed: grad_X needs the weight alone and stays exact.

With torch.compile: compile with facto_fx.compile first, then torch.compile the result; each
wrapped op runs eagerly between graph breaks. The "facto" backend refuses the method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

from facto_fx import ops
from facto_fx.eb_format import check_bound
from facto_fx.matches import ACTIVATION, BATCH_NORM, CONV, LINEAR, MUL, NORM, Match
from facto_fx.methods.base import Method, MethodConfig, RewriteSite, register_method


@dataclass(frozen=True)
class ErrorBounded(MethodConfig):
    """Hold the feature maps an op saves compressed, each element within a bound of its value; the
    error reaches the gradients only (the forward is exact).

    eb: the bound; relative=True reads it as a fraction of each tensor's value range (max − min,
    SZ's relative bound) instead of an absolute value. adaptive=True gives conv and linear layers
    COMET's eq. 1 bound instead (ops/error_bound.py): a weight-gradient error of `sigma` times the
    gradient's standard deviation, re-measured every `every` training calls on an uncompressed
    call; the other ops keep eb.
    """

    label = "eb"

    eb: float = 1e-2
    relative: bool = False
    adaptive: bool = False
    sigma: float = 0.1
    every: int = 100

    def __post_init__(self) -> None:
        check_bound(self.eb)
        for name in ("relative", "adaptive"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ErrorBounded({name}=...) must be True or False; got {getattr(self, name)!r}")
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float)) or not self.sigma > 0:
            raise ValueError(f"ErrorBounded(sigma=...) is the tolerated gradient error, > 0; got {self.sigma!r}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"ErrorBounded(every=...) counts training calls, an integer >= 1; got {self.every!r}")

    def bound(self, kind: str) -> ops.ErrorBound:
        """A fresh bound for one layer of `kind`."""
        if self.adaptive and kind in (CONV, LINEAR):
            return ops.ErrorBound(sigma=self.sigma, every=self.every)
        return ops.ErrorBound(relative=self.eb) if self.relative else ops.ErrorBound(eb=self.eb)


@register_method(ErrorBounded)
class _ErrorBounded(Method):
    kinds = frozenset({CONV, LINEAR, BATCH_NORM, ACTIVATION, NORM, MUL})
    wraps_op = True
    compiles = False  # saved-tensor hooks: torch.compile runs each such op eagerly, between graph breaks
    analytic_note = ("an upper bound, counted uncompressed (codes are never kept larger than the map); "
                     "a real run measures them")

    def rewrite(self, site: RewriteSite, match: Match, method: ErrorBounded) -> None:
        self.wrap(site, match.node, match.kind, method)

    def wrap(self, site: RewriteSite, node: fx.Node, kind: str, method: ErrorBounded) -> None:
        bound = method.bound(kind)
        if node.op == "call_module":
            # The module stays where it is (same names, same state_dict); the node calls it through
            # compressed_call instead of directly.
            with node.graph.inserting_before(node):
                module = node.graph.get_attr(node.target)
            site.use_function(node, ops.CompressedFunction(None, bound), (module, *node.args), dict(node.kwargs))
            return
        fn = getattr(torch.Tensor, node.target) if node.op == "call_method" else node.target
        site.use_function(node, ops.CompressedFunction(fn, bound), node.args, dict(node.kwargs))

    def node_note(self, node: fx.Node) -> str | None:
        bound = node.target.bound
        if bound.eb is None:
            return f"{bound!r}: not compressed yet (an adaptive bound measures its first call)"
        return f"eb {bound.eb:.3g} ({bound!r}), codes {bound.ratio:.1f}x smaller than the maps"

    def node_state(self, node: fx.Node) -> dict | None:
        return node.target.bound.state_dict()

    def load_node_state(self, node: fx.Node, state: dict) -> None:
        node.target.bound.load_state_dict(state)

    def summarize(self, nodes: Sequence[fx.Node]) -> str | None:
        bounds = [n.target.bound for n in nodes if n.target.bound.kept_bytes]
        if not bounds:
            return None
        ebs = [b.eb for b in bounds]
        dense, kept = sum(b.dense_bytes for b in bounds), sum(b.kept_bytes for b in bounds)
        return (f"error-bounded: {len(bounds)} layers, codes {dense / kept:.1f}x smaller than their maps, "
                f"eb {min(ebs):.2g} to {max(ebs):.2g} (per layer: facto_fx.report)")
