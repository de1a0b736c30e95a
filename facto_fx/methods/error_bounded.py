"""Error-bounded lossy compression of saved activations (COMET, shared/papers/
error-bounded-lossy-compression.txt; docs/design.md §6).

The op is kept exactly as it is and called through `ops.compressed_call`: its output is exact, and
the feature maps it saves for backward are held as SZ-style codes within `eb` of every element
(ops/eb_codec.py). It takes every op that saves a feature map, including those no Facto operator
covers: SiLU / GELU / Hardswish / sigmoid, layer and group norm, batch-norm with batch statistics,
products of feature maps (squeeze-excite), grouped and depthwise convs. On a conv or linear layer
only the input kept for grad_W is compressed: grad_X needs the weight alone and stays exact.

With torch.compile: compile with facto_fx.compile first, then torch.compile the result; each
wrapped op runs eagerly between graph breaks. The "facto" backend refuses the method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from facto_fx import ops
from facto_fx.eb_format import check_bound
from facto_fx.methods.base import Method, MethodConfig, RewriteSite, register_method
from facto_fx.passes.match import ACTIVATION, BATCH_NORM, CONV, LINEAR, MUL, NORM, Match


@dataclass(frozen=True)
class ErrorBounded(MethodConfig):
    """Hold the feature maps an op saves compressed, each element within `eb` (absolute) of its
    value; the error reaches the gradients only (the forward is exact)."""

    label = "eb"

    eb: float = 1e-2

    def __post_init__(self) -> None:
        check_bound(self.eb)


@register_method(ErrorBounded)
class _ErrorBounded(Method):
    kinds = frozenset({CONV, LINEAR, BATCH_NORM, ACTIVATION, NORM, MUL})
    wraps_op = True
    compiles = False  # saved-tensor hooks: torch.compile runs each such op eagerly, between graph breaks

    def rewrite(self, site: RewriteSite, match: Match, method: ErrorBounded) -> None:
        node = match.node
        if match.module is not None:
            # The module stays where it is (same names, same state_dict); the node calls it through
            # compressed_call instead of directly.
            with node.graph.inserting_before(node):
                module = node.graph.get_attr(node.target)
            site.use_function(node, ops.compressed_call, (method.eb, module, *node.args), dict(node.kwargs))
            return
        fn = getattr(torch.Tensor, node.target) if node.op == "call_method" else node.target
        site.use_function(node, ops.CompressedFunction(fn, method.eb), node.args, dict(node.kwargs))
