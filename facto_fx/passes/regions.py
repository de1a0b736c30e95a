"""The region matcher for row-centric strips: which nodes are spatially local, and the chain of
them that starts at the input.

A node is *local* along the height when each output row depends only on a window of input rows
given by a kernel, stride, padding and dilation (a pointwise op is the window 1, 1, 0, 1), and
padding is the same at a strip's border as at the map's. Everything else (flatten, global
pooling, linear, batch-norm with batch statistics, random ops) ends the chain. `find_region`
returns the longest chain from the input whose only value used after it is its last node, and
the points inside it where a single value is live (where a strip segment may end).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from facto_fx import layers, ops
from facto_fx.matches import call_args
from facto_fx.ops.row_strips import RowGeometry

POINTWISE = RowGeometry()


def _pair_first(value: object) -> int:
    return value[0] if isinstance(value, (tuple, list)) else value


def _conv_geometry(kernel: object, stride: object, padding: object, dilation: object) -> RowGeometry | str:
    k, s, d = _pair_first(kernel), _pair_first(stride), _pair_first(dilation)
    if padding == "valid":
        padding = 0
    elif padding == "same":
        if (d * (k - 1)) % 2:
            return "padding='same' with an even kernel pads unevenly"
        padding = d * (k - 1) // 2
    return RowGeometry(k, s, _pair_first(padding), d)


def _pool_geometry(kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, **_) -> RowGeometry:
    k = _pair_first(kernel_size)
    s = _pair_first(stride) if stride not in (None, [], ()) else k
    return RowGeometry(k, s, _pair_first(padding), _pair_first(dilation), bool(ceil_mode))


def _conv_module(m: nn.Module) -> RowGeometry | str:
    if isinstance(m, nn.Conv2d) and type(m)._conv_forward is not nn.Conv2d._conv_forward:
        return f"{type(m).__name__} overrides how it pads or convolves"
    if getattr(m, "padding_mode", "zeros") != "zeros":
        return f"padding_mode={m.padding_mode!r} pads with values from the map"
    return _conv_geometry(getattr(m, "kernel_size", None) or tuple(m.weight.shape[2:]), m.stride, m.padding, m.dilation)


def _pooled(geometry: RowGeometry | str, lossy_kernel: int) -> RowGeometry | str:
    """The rows of an op that saves its map mean-pooled in k×k tiles (Facto's conv, scale and
    frozen batch-norm), computed in whole tiles: a strip that pooled part of a tile would train on
    another map than the unsplit op (`RowGeometry.tiled`)."""
    return geometry if isinstance(geometry, str) else dataclasses.replace(geometry, tile=lossy_kernel)


#: Why a chain ends at a batch-norm that normalizes by batch statistics, with the fix.
BATCH_STATISTICS_STOP = ("batch statistics: each strip would see its own (compile with batch_norm='freeze' to let "
                         "strips cross it)")


def _facto_batch_norm_module(m: layers.FactoBatchNorm) -> RowGeometry | str:
    if m.batch_statistics:
        return BATCH_STATISTICS_STOP
    return _pooled(POINTWISE, m.lossy_kernel)


# Modules by class: the forward must be the class's own (a subclass may pad or pool in forward).
_MODULES: dict[type[nn.Module], Callable[[nn.Module], RowGeometry | str]] = {
    nn.Conv2d: _conv_module,
    layers.FactoConv2d: lambda m: _pooled(_conv_module(m), m.lossy_kernel),
    layers.HOSVDConv2d: _conv_module,
    nn.MaxPool2d: lambda m: "return_indices=True" if m.return_indices else _pool_geometry(
        m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode),
    nn.AvgPool2d: lambda m: _pool_geometry(m.kernel_size, m.stride, m.padding, 1, m.ceil_mode),
    layers.FactoBatchNorm: _facto_batch_norm_module,
    **{cls: (lambda m: POINTWISE) for cls in (
        nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Mish,
        nn.LeakyReLU, nn.ELU, nn.Identity,
    )},
}
_RANDOM_MODULES = (nn.Dropout, nn.Dropout2d, layers.FactoDropout)

_POOL_FUNCTIONS = {F.max_pool2d, torch.max_pool2d, ops.max_pool2d, F.avg_pool2d, torch._C._nn.avg_pool2d}
_POOLED_FUNCTIONS = {ops.scale, ops.batch_norm}  # pointwise, saving the map pooled by their lossy_kernel
_POINTWISE_FUNCTIONS = {
    ops.relu, ops.fewbit_activation, F.relu, torch.relu, F.relu6, F.hardtanh, F.silu, F.gelu, F.hardswish,
    F.hardsigmoid, torch.sigmoid, F.sigmoid, torch.tanh, F.leaky_relu, F.elu, F.mish,
    operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.truediv,
    torch.add, torch.mul, torch.sub,
}
_POINTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "add", "add_", "mul", "mul_", "contiguous"}
_RANDOM_FUNCTIONS = {F.dropout, F.dropout2d, ops.dropout}


def _arguments(node: fx.Node, fn: Callable, args: tuple) -> dict | str:
    try:
        return call_args(node, fn, args)
    except (ValueError, TypeError, RuntimeError):
        return f"the arguments of {getattr(fn, '__name__', fn)} could not be read"


def _function_geometry(node: fx.Node, fn: Callable, args: tuple) -> RowGeometry | str | None:
    if fn in _RANDOM_FUNCTIONS:
        return "random: a recomputed strip would draw another mask"
    if fn in _POINTWISE_FUNCTIONS:
        return POINTWISE
    if fn in _POOLED_FUNCTIONS:
        bound = _arguments(node, fn, args)
        return bound if isinstance(bound, str) else _pooled(POINTWISE, bound["lossy_kernel"])
    if fn in _POOL_FUNCTIONS:
        bound = _arguments(node, fn, args)
        if isinstance(bound, str) or bound.get("return_indices"):
            return bound if isinstance(bound, str) else "return_indices=True"
        return _pool_geometry(**{k: v for k, v in bound.items() if k not in ("input", "x")})
    if fn in (F.conv2d, torch.conv2d):
        bound = _arguments(node, fn, args)
        if isinstance(bound, str):
            return bound
        weight = bound["weight"]
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            return "a convolution whose weight is computed in the graph"
        kernel = _attr(node.graph.owning_module, weight.target).shape[2]
        return _conv_geometry(kernel, bound["stride"], bound["padding"], bound["dilation"])
    return None


def _module_geometry(module: nn.Module) -> RowGeometry | str:
    if module._forward_hooks or module._forward_pre_hooks or parametrize.is_parametrized(module):
        return "it has forward hooks or parametrizations (spectral norm...), which would run once per strip"
    if isinstance(module, _RANDOM_MODULES):
        return "random: a recomputed strip would draw another mask"
    for cls, geometry in _MODULES.items():
        if type(module).forward is cls.forward and isinstance(module, cls):
            return geometry(module)
    return f"{type(module).__name__} is not known to be local along the height"


def _constant_maps(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why a parameter or buffer the node reads would need rows of its own (a positional map)."""
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            value = _attr(gm, arg.target)
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[-2] > 1:
                return f"it reads {arg.target}, a tensor with {value.shape[-2]} rows of its own"
    return None


def _attr(gm: fx.GraphModule, target: str) -> object:
    value: object = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def row_geometry(gm: fx.GraphModule, node: fx.Node) -> RowGeometry | str:
    """The node's window along the height, or why it is not spatially local."""
    if node.op == "call_module":
        return _module_geometry(gm.get_submodule(node.target))
    if node.op == "call_method":
        if node.target not in _POINTWISE_METHODS:
            return f"method .{node.target}() is not known to be local along the height"
        return _constant_maps(gm, node) or POINTWISE
    if node.op != "call_function":
        return f"a {node.op} node"
    fn, args = node.target, tuple(node.args)
    if isinstance(fn, ops.CompressedFunction):  # an ErrorBounded wrapper: the op it runs decides
        if fn.bound.sigma is not None:
            return "ErrorBounded's adaptive bound measures gradients a checkpointed strip would not give it"
        if fn.fn is None:
            inner = args[0]
            if isinstance(inner, fx.Node) and inner.op == "get_attr":
                return _module_geometry(_attr(gm, inner.target))
            return "it wraps a module the graph does not name"
        fn = fn.fn
    geometry = _function_geometry(node, fn, args)
    if geometry is None:
        return f"{getattr(fn, '__name__', fn)} is not known to be local along the height"
    if isinstance(geometry, RowGeometry) and geometry.kernel == 1 and geometry.stride == 1:
        return _constant_maps(gm, node) or geometry
    return geometry


@dataclass
class Region:
    """A chain of local nodes from the graph's input, in graph order.

    `cuts` are the nodes after which their own value is the only one of the chain still used
    (the input first, `nodes[-1]` last): a strip segment runs from one cut to a later one.
    `stop` says why the chain ends where it does.
    """

    input: fx.Node
    nodes: list[fx.Node]
    geometry: dict[fx.Node, RowGeometry]
    cuts: list[fx.Node]
    stop: str

    @property
    def output(self) -> fx.Node:
        return self.nodes[-1]


def find_region(gm: fx.GraphModule) -> Region | str:
    """The longest chain of local nodes from the (single) input that ends in one value, or why
    there is none."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return f"the model takes {len(placeholders)} inputs; strips start from a single image input"
    source = placeholders[0]
    inside = {source}
    geometry: dict[fx.Node, RowGeometry] = {}
    order: list[fx.Node] = []
    stop = "the graph ends"
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output") or not any(a in inside for a in node.all_input_nodes):
            if node.op == "output":
                stop = "the graph's output"
                break
            continue
        found = row_geometry(gm, node)
        if isinstance(found, str) or any(a not in inside and a.op != "get_attr" for a in node.all_input_nodes):
            why = found if isinstance(found, str) else "it also reads a value from outside the chain"
            stop = f"{node.name}: {why}"
            break
        geometry[node] = found
        inside.add(node)
        order.append(node)
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    cuts, reach = [source], max((position[u] for u in source.users), default=0)
    for node in order:  # a cut: nothing defined before it is used after it
        if reach <= position[node]:
            cuts.append(node)
        reach = max([reach, *(position[u] for u in node.users)])
    if len(cuts) < 2:
        return f"no spatially local layer follows the input ({stop})"
    nodes = order[: order.index(cuts[-1]) + 1]
    return Region(source, nodes, {n: geometry[n] for n in nodes}, cuts, stop)
