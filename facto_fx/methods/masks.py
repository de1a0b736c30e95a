"""Packed masks (docs/design.md §2): ReLU, max-pool and dropout save bit-packed codes (1 bit per
element; argmax codes of log2(window) bits for max-pool) instead of their input. Lossless."""

from __future__ import annotations

from dataclasses import dataclass

from facto_fx import ops
from facto_fx.layers import FactoDropout
from facto_fx.matches import DROPOUT, MAX_POOL, RELU, Match, call_args, op_input
from facto_fx.methods.base import Method, MethodConfig, PlanContext, RewriteSite, register_method
from facto_fx.shapes import SUPPORTED_BITS, code_bits, pair

_MAX_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")


@dataclass(frozen=True)
class PackedMasks(MethodConfig):
    """Bit-packed masks for ReLU, max-pool and dropout; exact gradients."""

    label = "facto"


def _max_pool_kwargs(match: Match) -> dict:
    if match.module is not None:
        return {name: getattr(match.module, name) for name in _MAX_POOL_ARGS}
    args = call_args(match.node)
    return {name: args[name] for name in _MAX_POOL_ARGS}


@register_method(PackedMasks)
class Masks(Method):
    kinds = frozenset({RELU, MAX_POOL, DROPOUT})
    modules = (FactoDropout,)

    def refuses(self, match: Match, method: MethodConfig, context: PlanContext) -> str | None:
        if match.kind != MAX_POOL:
            return None
        kh, kw = pair(_max_pool_kwargs(match)["kernel_size"])
        if kh * kw > 2 ** SUPPORTED_BITS[-1] or code_bits(kh * kw) not in SUPPORTED_BITS:
            return f"{kh}x{kw} windows need more than 8 bits per argmax code"
        return None

    def rewrite(self, site: RewriteSite, match: Match, method: PackedMasks) -> None:
        node, x = match.node, op_input(match)
        if match.kind == RELU:
            site.use_function(node, ops.relu, (x,), {})
        elif match.kind == MAX_POOL:
            site.use_function(node, ops.max_pool2d, (x,), _max_pool_kwargs(match))
        elif match.module is not None:
            site.use_layer(match, FactoDropout(match.module.p))
        else:
            args = call_args(node)
            site.use_function(node, ops.dropout, (x, args["p"], args["training"]), {})
