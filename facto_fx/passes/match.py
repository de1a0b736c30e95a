"""The matcher: find the nodes a Facto operator can replace, in call_module and call_function form.

Each match records what the node is (`kind`), a readable layer name shared by the original and the
rewritten graph, and, when the node cannot be rewritten, why.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from facto_fx.ops.bitpack import SUPPORTED_BITS, code_bits

CONV, LINEAR, RELU, MAX_POOL, SCALE, BATCH_NORM, DROPOUT = (
    "conv2d", "linear", "relu", "max_pool2d", "scale", "batch_norm", "dropout"
)
LOW_RANK_KINDS = (CONV, LINEAR)
ORDERED_KINDS = (CONV, SCALE, BATCH_NORM)  # what apply_ratio counts (paper §4.2)

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU_METHODS = {"relu", "relu_"}
_MAX_POOL_FUNCTIONS = {F.max_pool2d, torch.max_pool2d}
_MUL_FUNCTIONS = {operator.mul, torch.mul, operator.imul}
_DROPOUT_FUNCTIONS = {F.dropout}
_UNSUPPORTED_MODULES = {
    nn.Conv1d: "only 2-D convolutions are rewritten",
    nn.Conv3d: "only 2-D convolutions are rewritten",
    nn.ConvTranspose2d: "transposed convolutions are not rewritten",
    nn.GroupNorm: "group-norm is not a Facto operator; it keeps its saved input",
    nn.LayerNorm: "layer-norm is not a Facto operator; it keeps its saved input",
    nn.SiLU: "only ReLU activations are binarised; SiLU keeps its saved input",
    nn.GELU: "only ReLU activations are binarised; GELU keeps its saved input",
    nn.Hardswish: "only ReLU activations are binarised; Hardswish keeps its saved input",
    nn.ReLU6: "ReLU6 needs two bits (below 0, above 6); it keeps its saved output",
}


@dataclass
class Match:
    """One candidate node: its kind, readable layer name, and why it cannot be rewritten (if so)."""

    node: fx.Node
    kind: str
    layer: str
    module: nn.Module | None = None
    unsupported: str | None = None


def _get_attr_param(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    """The Parameter a get_attr node reads, or None for anything else."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    try:
        return gm.get_parameter(node.target)
    except AttributeError:
        return None


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


def _conv_problem(conv: nn.Conv2d) -> str | None:
    if conv.groups != 1:
        return f"grouped convolution (groups={conv.groups}) is not supported; left dense and trainable"
    if conv.padding_mode != "zeros":
        return f"padding_mode='{conv.padding_mode}' is not supported; left dense and trainable"
    if isinstance(conv.padding, str):
        return f"padding='{conv.padding}' is not supported; left dense and trainable"
    return None


def _max_pool_problem(kernel_size) -> str | None:
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    if kh * kw > 2 ** SUPPORTED_BITS[-1] or code_bits(kh * kw) not in SUPPORTED_BITS:
        return f"{kh}x{kw} windows need more than 8 bits per argmax code"
    return None


def _match_module(gm: fx.GraphModule, node: fx.Node) -> Match | None:
    module = gm.get_submodule(node.target)
    layer = node.target
    if isinstance(module, nn.Conv2d):
        return Match(node, CONV, layer, module, _conv_problem(module))
    if isinstance(module, nn.Linear):
        return Match(node, LINEAR, layer, module)
    if isinstance(module, nn.ReLU):
        return Match(node, RELU, layer, module, inplace_aliasing(node) if module.inplace else None)
    if isinstance(module, nn.MaxPool2d):
        problem = "return_indices=True is not supported" if module.return_indices else None
        return Match(node, MAX_POOL, layer, module, problem or _max_pool_problem(module.kernel_size))
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        problem = None if module.track_running_stats else "no running statistics to freeze"
        return Match(node, BATCH_NORM, layer, module, problem)
    if isinstance(module, nn.Dropout):
        problem = inplace_aliasing(node) if module.inplace else None
        return Match(node, DROPOUT, layer, module, problem)
    for cls, reason in _UNSUPPORTED_MODULES.items():
        if type(module) is cls:
            return Match(node, type(module).__name__, layer, module, reason)
    return None


def _match_function(gm: fx.GraphModule, node: fx.Node) -> Match | None:
    target = node.target
    if node.op == "call_method" and target in _RELU_METHODS or target in _RELU_FUNCTIONS:
        inplace = target in ("relu_", torch.relu_, F.relu_) or node.kwargs.get("inplace", False)
        return Match(node, RELU, node.name, None, inplace_aliasing(node) if inplace else None)
    if node.op != "call_function":
        return None
    if target in _MAX_POOL_FUNCTIONS:
        kernel = node.args[1] if len(node.args) > 1 else node.kwargs.get("kernel_size")
        problem = "return_indices=True is not supported" if node.kwargs.get("return_indices") else None
        return Match(node, MAX_POOL, node.name, None, problem or _max_pool_problem(kernel))
    if target in _MUL_FUNCTIONS and len(node.args) == 2:
        for position, arg in enumerate(node.args):
            param = _get_attr_param(gm, arg)
            if param is not None and param.numel() == 1:
                problem = "in-place multiply" if target is operator.imul else None
                other = node.args[1 - position]
                if not isinstance(other, fx.Node):
                    problem = "scale of a constant"
                return Match(node, SCALE, arg.target, None, problem)
    if target in _DROPOUT_FUNCTIONS:
        return Match(node, DROPOUT, node.name, None, "functional dropout: its training flag is traced as a constant")
    if target in (F.conv2d, torch.conv2d):
        return Match(node, CONV, node.name, None, "functional conv2d: only nn.Conv2d modules are rewritten")
    if target is F.linear:
        return Match(node, LINEAR, node.name, None, "functional linear: only nn.Linear modules are rewritten")
    return None


def find_matches(gm: fx.GraphModule) -> list[Match]:
    """Every node of a kind the pass knows, in graph order, with unique layer names.

    A module called twice (torchvision's BasicBlock reuses `self.relu`) gets "name#2" for its
    second call.
    """
    matches: list[Match] = []
    seen: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            match = _match_module(gm, node)
        elif node.op in ("call_function", "call_method"):
            match = _match_function(gm, node)
        else:
            match = None
        if match is not None:
            seen[match.layer] = seen.get(match.layer, 0) + 1
            if seen[match.layer] > 1:
                match.layer = f"{match.layer}#{seen[match.layer]}"
            matches.append(match)
    _mark_shared_modules(matches)
    return matches


def _mark_shared_modules(matches: list[Match]) -> None:
    """A stateful module called from several places cannot be swapped for just one of them."""
    calls: dict[int, list[Match]] = {}
    for match in matches:
        if match.module is not None and match.kind in (CONV, LINEAR, BATCH_NORM, DROPOUT):
            calls.setdefault(id(match.module), []).append(match)
    for shared in calls.values():
        if len(shared) > 1:
            for match in shared:
                match.unsupported = f"module is called {len(shared)} times; shared layers stay dense"
