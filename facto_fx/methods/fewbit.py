"""Few-bit activation codes (ops/fewbit.py; Novikov et al., "Few-Bit Backward", ICML 2023): an
activation's backward keeps f′(x) in a few bits per element instead of its input.

Exact for ReLU6, hardtanh, leaky ReLU and hardsigmoid, whose derivative takes two values (1 bit,
the gradient bit for bit torch's). SiLU, GELU, Hardswish, Mish, sigmoid, tanh and ELU keep f′ as
one of 2**bits levels (a Lloyd-Max table under N(0, 1)): the forward is exact, the gradient through
the activation is approximate (relative error 0.13-0.18 at 2 bits, 0.03-0.05 at 4, on N(0, 1)
inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from facto_fx import ops
from facto_fx.matches import ACTIVATION, Match, call_args, inplace_aliasing, op_input
from facto_fx.methods.base import Method, MethodConfig, PlanContext, RewriteSite, register_method
from facto_fx.ops.fewbit import EXACT_FUNCTIONS, FUNCTIONS, check_bits, resolve

# The modules and functions the matcher keeps as activations, by the op's function name; a
# module's parameters are its attributes of the same names as torch's keyword arguments.
_MODULES = {
    nn.ReLU6: "relu6", nn.Hardtanh: "hardtanh", nn.LeakyReLU: "leaky_relu", nn.Hardsigmoid: "hardsigmoid",
    nn.SiLU: "silu", nn.GELU: "gelu", nn.Hardswish: "hardswish", nn.Mish: "mish", nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh", nn.ELU: "elu",
}
_FUNCTIONS = {
    F.relu6: "relu6", F.hardtanh: "hardtanh", F.leaky_relu: "leaky_relu", F.hardsigmoid: "hardsigmoid",
    F.silu: "silu", F.gelu: "gelu", F.hardswish: "hardswish", F.mish: "mish", torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh", F.elu: "elu",
}
_TENSOR_METHODS = {"sigmoid": "sigmoid", "tanh": "tanh"}
OUTPUT_KEEPING = ("sigmoid", "tanh")


@dataclass(frozen=True)
class FewBitActivation(MethodConfig):
    """Keep an activation's derivative in `bits` bits per element (1, 2, 4 or 8) instead of its
    input; exact activations (ReLU6, hardtanh, leaky ReLU, hardsigmoid) keep 1 bit whatever `bits`."""

    label = "fewbit"

    bits: int = 2

    def __post_init__(self) -> None:
        try:
            check_bits(self.bits)
        except ValueError as error:
            raise ValueError(f"FewBitActivation(bits=...): {error}") from None


def activation(match: Match) -> tuple[str, dict[str, object]] | None:
    """(function name, torch keyword parameters) of a matched activation; None if it is not one the
    op computes."""
    node = match.node
    if match.module is not None:
        function = _MODULES.get(type(match.module))
        if function is None:
            return None
        return function, {name: getattr(match.module, name) for name in _parameter_names(function)}
    if node.op == "call_method":
        function = _TENSOR_METHODS.get(node.target)
        return None if function is None else (function, {})
    function = _FUNCTIONS.get(node.target)
    if function is None:
        return None
    args = call_args(node)
    return function, {name: args[name] for name in _parameter_names(function) if name in args}


def _parameter_names(function: str) -> list[str]:
    """torch's keyword parameters of `function` that the op takes (gelu's `approximate` too)."""
    return [name for name, _ in FUNCTIONS[function]] + (["approximate"] if function == "gelu" else [])


def is_exact(match: Match) -> bool:
    """Whether the activation's derivative takes two values, so 1 bit keeps it exactly."""
    found = activation(match)
    return found is not None and resolve(*found)[0] in EXACT_FUNCTIONS


def keeps_output(match: Match) -> bool:
    """Whether vanilla's activation keeps its output for backward (sigmoid, tanh), a map the layer
    after it usually keeps too: a code then adds to what is saved instead of replacing it."""
    found = activation(match)
    return found is not None and found[0] in OUTPUT_KEEPING


@register_method(FewBitActivation)
class _FewBit(Method):
    kinds = frozenset({ACTIVATION})

    def refuses(self, match: Match, method: MethodConfig, context: PlanContext) -> str | None:
        if activation(match) is None:
            return f"{type(match.module).__name__ if match.module is not None else match.node.target} " \
                   "is not an activation the few-bit op computes"
        if getattr(match.module, "inplace", False):
            return inplace_aliasing(match.node)
        return None

    def rewrite(self, site: RewriteSite, match: Match, method: FewBitActivation) -> None:
        function, params = activation(match)
        site.use_function(match.node, ops.fewbit_activation, (op_input(match),),
                          {"function": function, "bits": method.bits, **params})

    def node_note(self, node: fx.Node) -> str | None:
        function, _ = resolve(node.kwargs["function"], {
            k: v for k, v in node.kwargs.items() if k not in ("function", "bits")})
        if function in EXACT_FUNCTIONS:
            return f"{function}: f' in 1 bit per element, exact"
        return f"{function}: f' in {node.kwargs['bits']} bits per element (Lloyd-Max levels)"
