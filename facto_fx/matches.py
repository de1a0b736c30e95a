"""What a match is: the kinds of node the pass can rewrite, `Match`, and reading a call's arguments.

The matcher (passes/match.py) makes matches and the methods (facto_fx/methods) rewrite them; both
read these. A leaf: it imports neither passes nor methods, so neither package needs the other's
modules to load.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.operator_schemas import normalize_function

CONV, LINEAR, RELU, MAX_POOL, SCALE, BATCH_NORM, DROPOUT = (
    "conv2d", "linear", "relu", "max_pool2d", "scale", "batch_norm", "dropout"
)
# Kinds no Facto operator covers: only a method that wraps the op as it is (ErrorBounded) takes them.
ACTIVATION, NORM, MUL = "activation", "norm", "mul"
OPAQUE = "opaque"  # a sub-module kept as one call: never rewritten, listed with the tracer's reason
LOW_RANK_KINDS = (CONV, LINEAR)
ORDERED_KINDS = (CONV, SCALE, BATCH_NORM)  # what apply_ratio counts (paper §4.2)


@dataclass
class Match:
    """One candidate node: its kind, readable layer name, and why it cannot be rewritten (if so)."""

    node: fx.Node
    kind: str
    layer: str
    module: nn.Module | None = None
    unsupported: str | None = None
    kept: str | None = None  # why the default plan keeps it as it is (only some methods take it)


def _argument_type(value: object) -> object:
    if isinstance(value, fx.Node):
        return torch.Tensor
    if isinstance(value, (tuple, list)):
        return list[int]
    return type(value)


def call_args(node: fx.Node, function: Callable | None = None, args: tuple | None = None) -> dict[str, object]:
    """Every argument of a call_function node by its parameter name, defaults filled in.

    torch's own signature binding (torch.fx.operator_schemas); argument types pick between
    overloads such as conv2d's int and str paddings. `function` and `args` replace the node's
    target and positional arguments (the op a wrapper such as ErrorBounded's calls).
    """
    function = node.target if function is None else function
    args = node.args if args is None else args
    types = tuple(_argument_type(a) for a in args)
    kwarg_types = {k: _argument_type(v) for k, v in node.kwargs.items()}
    bound = normalize_function(
        function, args, node.kwargs, arg_types=types, kwarg_types=kwarg_types,
        normalize_to_only_use_kwargs=True,
    )
    if bound is None:
        raise ValueError(f"cannot bind the arguments of {node.format_node()} to {node.target}'s signature")
    return dict(bound.kwargs)


def op_input(match: Match) -> object:
    """The feature map a matched one-input op (activation, pool, dropout) reads: a module's or a
    tensor method's first argument, a function's `input`."""
    node = match.node
    return node.args[0] if match.module is not None or node.op == "call_method" else call_args(node)["input"]


_VIEW_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "transpose", "permute", "squeeze", "unsqueeze",
    "expand", "expand_as", "narrow", "select", "t", "unflatten", "as_strided", "contiguous", "__getitem__",
}
_VIEW_FUNCTIONS = {
    operator.getitem, torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze,
    torch.unsqueeze, torch.narrow, torch.select, torch.t,
}


def _may_alias(node: fx.Node) -> bool:
    """Whether `node`'s value may share storage with another value of the graph."""
    if node.op in ("placeholder", "get_attr"):
        return True
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_function" and node.target in _VIEW_FUNCTIONS


def inplace_aliasing(node: fx.Node) -> str | None:
    """Why an in-place op cannot become out-of-place: someone else may see its input change.

    Conservative: the input must be a fresh (non-view) value whose only reader is this op.
    """
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node):
        return None
    others = [user.name for user in source.users if user is not node]
    if others:
        return f"in-place op whose input is also read by {others[0]}"
    if _may_alias(source):
        return f"in-place op on {source.name}, which may alias another tensor"
    return None


def target_name(target: object) -> str:
    """A node target as a short name: a method's or module path's string, a function's __name__."""
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))
