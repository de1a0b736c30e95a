"""A fixed-rate store (ActNN / GACT style; ops/quantized.py) for the maps no other form covers:
grouped and depthwise convs keep their input, products of feature maps (squeeze-excite gates)
their factors, layer and group norms their normalised input x̂ (and 1/σ per row;
ops/quantized_norm.py), as `bits`-bit codes per element with a min and a scale per group of `group`
elements of one sample, stochastically rounded so the gradient stays unbiased. The forward is
exact; a conv's grad_X too (it needs the weight alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, fx, nn

from facto_fx import ops
from facto_fx.layers import QuantizedConv2d
from facto_fx.matches import CONV, MUL, NORM, Match, call_args
from facto_fx.methods.base import Method, MethodConfig, PlanContext, RewriteSite, module_tensors, register_method
from facto_fx.ops.quantized import DEFAULT_BITS, DEFAULT_GROUP, check_bits, check_group


@dataclass(frozen=True)
class FixedRate(MethodConfig):
    """Keep what a conv (its input), a product of feature maps (its factors) or a layer / group norm
    (x̂) saves in `bits` bits per element (2, 4 or 8), groups of `group` elements sharing a min and a
    scale (fp32)."""

    label = "fixed"

    bits: int = DEFAULT_BITS
    group: int = DEFAULT_GROUP

    def __post_init__(self) -> None:
        for name, check in (("bits", check_bits), ("group", check_group)):
            try:
                check(getattr(self, name))
            except ValueError as error:
                raise ValueError(f"FixedRate({name}=...): {error}") from None


def codes_note(bits: int, group: int) -> str:
    """How the report names the store's codes."""
    return f"{bits} bits per element (fixed rate, groups of {group})"


def _conv_arguments(match: Match) -> dict:
    if match.module is not None:
        conv = match.module
        return {"padding": conv.padding, "padding_mode": conv.padding_mode, "weight": conv.weight}
    args = call_args(match.node)
    return {"padding": args["padding"], "padding_mode": "zeros", "weight": None}


# A norm's functional form and its arguments after the input, from the module or the call.
_NORM_FUNCTIONS = {nn.LayerNorm: F.layer_norm, nn.GroupNorm: F.group_norm}
_QUANTIZED_NORMS = {F.layer_norm: ops.quantized_layer_norm, F.group_norm: ops.quantized_group_norm}


def _norm_call(match: Match) -> tuple[object, tuple]:
    """(torch's norm function, its arguments as graph values) of a matched module or call."""
    node, module = match.node, match.module
    if module is None:
        function = node.target
        args = call_args(node)
        shape = args["normalized_shape" if function is F.layer_norm else "num_groups"]
        return function, (args["input"], shape, args["weight"], args["bias"], args["eps"])
    function = _NORM_FUNCTIONS[type(module)]
    weight, bias = module_tensors(node.graph, node, module, ("weight", "bias"))
    shape = list(module.normalized_shape) if function is F.layer_norm else module.num_groups
    return function, (node.args[0], shape, weight, bias, module.eps)


@register_method(FixedRate)
class _FixedRate(Method):
    kinds = frozenset({CONV, MUL, NORM})
    modules = (QuantizedConv2d,)

    def refuses(self, match: Match, method: MethodConfig, context: PlanContext) -> str | None:
        if match.kind != CONV:
            return None
        args = _conv_arguments(match)
        if isinstance(args["padding"], str):
            return f"padding='{args['padding']}' is not supported; left dense"
        if args["padding_mode"] != "zeros":
            return f"padding_mode='{args['padding_mode']}' is not supported; left dense"
        if args["weight"] is not None and not args["weight"].requires_grad:
            return "its weight is frozen: there is no weight gradient whose input to compress"
        return None

    def rewrite(self, site: RewriteSite, match: Match, method: FixedRate) -> None:
        node = match.node
        codes = {"bits": method.bits, "group": method.group}
        if match.kind == MUL:
            site.use_function(node, ops.quantized_mul, tuple(node.args), codes)
            return
        if match.kind == NORM:
            function, args = _norm_call(match)
            site.use_function(node, _QUANTIZED_NORMS[function], args, codes)
            return
        if match.module is not None:
            site.use_layer(match, QuantizedConv2d.from_conv(match.module, method.bits, method.group))
            return
        args = call_args(node)
        layer = QuantizedConv2d(site.tensor(args["weight"]), site.tensor(args["bias"]), args["stride"],
                                args["padding"], args["dilation"], args["groups"], method.bits, method.group)
        site.use_layer(match, layer)

    def node_note(self, node: fx.Node) -> str | None:
        codes = codes_note(node.kwargs.get("bits"), node.kwargs.get("group"))
        if node.target is ops.quantized_mul:
            return f"factors in {codes}"
        if node.target in _QUANTIZED_NORMS.values():
            return f"x̂ in {codes}, 1/σ per row"
        return None

    def describe(self, layer: QuantizedConv2d, x: Tensor) -> str | None:
        return f"input in {codes_note(layer.bits, layer.group)}"
