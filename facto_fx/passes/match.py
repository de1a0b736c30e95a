"""The matcher: find the nodes a Facto operator can replace, in call_module and call_function form.

Each match records what the node is (`kind`), a readable layer name shared by the original and the
rewritten graph, and, when the node cannot be rewritten, why.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from facto_fx.matches import (
    ACTIVATION,
    BATCH_NORM,
    CONV,
    DROPOUT,
    LINEAR,
    MAX_POOL,
    MUL,
    NORM,
    OPAQUE,
    RELU,
    SCALE,
    Match,
    call_args,
    inplace_aliasing,
    target_name,
)
from facto_fx.passes.trace import OPAQUE_META, hook_reason, owner_module

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU_METHODS = {"relu", "relu_"}
_MAX_POOL_FUNCTIONS = {F.max_pool2d, torch.max_pool2d}
_MUL_FUNCTIONS = {operator.mul, torch.mul, operator.imul}
_SHAPE_METHODS = {"size", "dim", "numel"}
_SHAPE_ATTRIBUTES = {"shape", "ndim"}
_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
               operator.neg, operator.pow}
_DROPOUT_FUNCTIONS = {F.dropout}
_CONV_FUNCTIONS = {F.conv2d, torch.conv2d}
_LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear}
_BATCH_NORM_FUNCTIONS = {F.batch_norm}
WEIGHTED_FUNCTIONS = _CONV_FUNCTIONS | _LINEAR_FUNCTIONS  # functional layers whose argument 1 is a weight

# The module classes a Facto layer replaces whole, and the methods that define what they compute:
# a subclass overriding one of them computes something else, so it is never swapped.
_EXACT_MODULES = {
    CONV: (nn.Conv2d, ("forward", "_conv_forward")),
    LINEAR: (nn.Linear, ("forward",)),
    RELU: (nn.ReLU, ("forward",)),
    MAX_POOL: (nn.MaxPool2d, ("forward",)),
    BATCH_NORM: (nn.modules.batchnorm._BatchNorm, ("forward",)),
    DROPOUT: (nn.Dropout, ("forward",)),
}
# Other forwards that compute the same as the base class in the form the pass uses: frozen
# statistics are SyncBatchNorm's eval-mode forward.
_EQUIVALENT_FORWARDS = {nn.SyncBatchNorm.forward}
_UNSUPPORTED_MODULES = {
    nn.Conv1d: "only 2-D convolutions are rewritten",
    nn.Conv3d: "only 2-D convolutions are rewritten",
    nn.ConvTranspose2d: "transposed convolutions are not rewritten",
}
# Ops kept as they are by default, each with why; a method that wraps the op whole can take them.
_KEPT_MODULES = {
    nn.GroupNorm: (NORM, "group-norm is not a Facto operator; it keeps its saved input"),
    nn.LayerNorm: (NORM, "layer-norm is not a Facto operator; it keeps its saved input"),
    **{cls: (ACTIVATION, f"{cls.__name__} is left as it is; it keeps what it saves") for cls in (
        nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Mish,
        nn.LeakyReLU, nn.ELU,
    )},
}
_KEPT_FUNCTIONS = {
    **dict.fromkeys((F.silu, F.gelu, F.hardswish, F.hardsigmoid, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
                     F.relu6, F.hardtanh, F.mish, F.leaky_relu, F.elu), ACTIVATION),
    **dict.fromkeys((F.layer_norm, F.group_norm), NORM),
}
_KEPT_METHODS = {"sigmoid": ACTIVATION, "tanh": ACTIVATION}
_KEPT_REASONS = {
    ACTIVATION: "{} is left as it is; it keeps what it saves",
    NORM: "{} is not a Facto operator; it keeps its saved input",
    MUL: "a product of two feature maps (squeeze-excite, gating) keeps both; {}",
}


class GraphTensors:
    """The parameters and buffers a graph reads, by node, with their qualified names.

    In the FX pass's trace they are get_attr nodes; in a graph dynamo captured they are lifted
    placeholders (`lifted`: node -> (name, tensor), given by the backend), and a batch-norm's
    `training=True` is the module's mode, not a choice of batch statistics. Everything else the
    matcher and the rewriter do is the same for both.
    """

    def __init__(self, gm: fx.GraphModule, lifted: dict[fx.Node, tuple[str, Tensor]] | None = None) -> None:
        self.gm = gm
        self.lifted = lifted

    def lookup(self, node: object) -> tuple[str, Tensor] | None:
        """(qualified name, tensor) for a node that reads a parameter or buffer, else None."""
        if not isinstance(node, fx.Node):
            return None
        if self.lifted is not None:
            return self.lifted.get(node)
        if node.op != "get_attr":
            return None
        try:
            value = self.gm.get_parameter(node.target)
        except AttributeError:
            try:
                value = self.gm.get_buffer(node.target)
            except AttributeError:
                return None
        return node.target, value

    def tensor(self, node: object) -> Tensor | None:
        found = self.lookup(node)
        return None if found is None else found[1]

    def name(self, node: object) -> str | None:
        found = self.lookup(node)
        return None if found is None else found[0]

    def parameter(self, node: object) -> Tensor | None:
        value = self.tensor(node)
        return value if isinstance(value, nn.Parameter) else None

    def buffer(self, node: object) -> Tensor | None:
        value = self.tensor(node)
        return value if isinstance(value, Tensor) and not isinstance(value, nn.Parameter) else None


def module_problem(module: nn.Module, kind: str) -> str | None:
    """Why swapping `module` for the Facto layer of `kind` would change what the model computes."""
    reason = hook_reason(module)
    if reason is not None:
        return reason
    base, methods = _EXACT_MODULES[kind]
    for method in methods:
        impl = getattr(type(module), method)
        if method in vars(module) or impl is not getattr(base, method) and impl not in _EQUIVALENT_FORWARDS:
            return (
                f"{type(module).__name__} overrides {base.__name__}.{method}, so a Facto layer would compute "
                f"only the {base.__name__} part; left dense"
            )
    return None


def _match_module(gm: fx.GraphModule, node: fx.Node) -> Match | None:
    module = gm.get_submodule(node.target)
    layer = node.target
    kind = next((k for k, (base, _) in _EXACT_MODULES.items() if isinstance(module, base)), None)
    problem = module_problem(module, kind) if kind is not None else None
    opaque = gm.meta.get(OPAQUE_META, {}).get(layer)
    if opaque is not None and (kind is None or problem is not None):
        reasons = [opaque] + ([problem] if problem not in (None, opaque) else [])
        return Match(node, kind or OPAQUE, layer, module, f"{type(module).__name__} {'; '.join(reasons)}")
    if kind is None and type(module) in _KEPT_MODULES:
        kept_kind, reason = _KEPT_MODULES[type(module)]
        return Match(node, kept_kind, layer, module, kept=reason)
    if kind is None or problem is not None:
        for cls, reason in _UNSUPPORTED_MODULES.items():
            if type(module) is cls:
                return Match(node, type(module).__name__, layer, module, reason)
        if kind is None and any(True for _ in module.parameters()):
            # A leaf torch.fx chose (torch.nn's own modules): its layers are never seen, so never rewritten.
            why = f"{type(module).__name__} is a torch.nn module torch.fx calls whole; no method rewrites what it saves"
            return Match(node, OPAQUE, layer, module, why)
        return None if kind is None else Match(node, kind, layer, module, problem)
    if kind == RELU:
        problem = inplace_aliasing(node) if module.inplace else None
    elif kind == MAX_POOL:
        problem = "return_indices=True is not supported" if module.return_indices else None
    elif kind == BATCH_NORM:
        problem = None if module.track_running_stats else "no running statistics to freeze"
    elif kind == DROPOUT:
        problem = inplace_aliasing(node) if module.inplace else None
    return Match(node, kind, layer, module, problem)


def _owner(name: str) -> str:
    return name.rpartition(".")[0]


def _weighted_function_problem(tensors: GraphTensors, kind: str, args: dict) -> str | None:
    """Why a functional conv / linear cannot become a layer in place of its weight's module."""
    weight, bias = args["weight"], args["bias"]
    if tensors.parameter(weight) is None:
        return f"functional {kind} whose weight is computed in forward (weight standardisation, ...); left dense"
    if bias is not None and tensors.parameter(bias) is None:
        return f"functional {kind} whose bias is not a parameter; left dense"
    if len(weight.users) > 1:
        return f"weight '{tensors.name(weight)}' is also read elsewhere in forward; left dense"
    owner = _owner(tensors.name(weight))
    expected = {f"{owner}.weight", f"{owner}.bias"}
    if not owner or tensors.name(weight) != f"{owner}.weight" or bias is not None and (
        tensors.name(bias) != f"{owner}.bias"
    ):
        return f"functional {kind} on parameters not named <module>.weight / <module>.bias; left dense"
    others = []
    for n in tensors.gm.graph.nodes:
        name = n.target if n.op == "call_module" else tensors.name(n)
        if name is not None and (name == owner or str(name).startswith(f"{owner}.")) and name not in expected:
            others.append(n.name)
    if others:
        return f"module '{owner}' is also used by {others[0]}; left dense"
    return None


def _match_batch_norm_function(tensors: GraphTensors, node: fx.Node, args: dict) -> Match:
    mean, var = args["running_mean"], args["running_var"]
    if tensors.buffer(mean) is None or tensors.buffer(var) is None:
        return Match(node, BATCH_NORM, node.name, None, "batch statistics only (no running statistics to freeze)")
    layer = _owner(tensors.name(mean)) or node.name
    if args["training"] is True and tensors.lifted is None:
        return Match(node, BATCH_NORM, layer, None, "uses batch statistics in every mode; left dense")
    for name in ("weight", "bias"):
        value = args[name]
        if value is not None and tensors.parameter(value) is None:
            return Match(node, BATCH_NORM, layer, None, f"functional batch-norm whose {name} is not a parameter")
    return Match(node, BATCH_NORM, layer)


def _kept_function(node: fx.Node, kind: str) -> Match:
    name = target_name(node.target)
    inplace = node.kwargs.get("inplace", False) or name.endswith("_") or node.target is operator.imul
    return Match(node, kind, node.name, None, "in-place op" if inplace else None,
                 kept=_KEPT_REASONS[kind].format(name))


def shape_arithmetic(node: fx.Node) -> bool:
    """Whether `node` computes sizes from shapes (ints, not a tensor): ViT's `h // p * (w // p)` is a
    product no Facto operator may take. A node a trace recorded a value for says so by that value."""
    value = node.meta.get("val", node.meta.get("example_value"))
    if value is not None:
        return not isinstance(value, Tensor)
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op != "call_function":
        return False
    if node.target is getattr:
        return node.args[1] in _SHAPE_ATTRIBUTES
    if node.target is operator.getitem:
        return isinstance(node.args[0], fx.Node) and shape_arithmetic(node.args[0])
    operands = [a for a in node.args if isinstance(a, fx.Node)]
    return node.target in _ARITHMETIC and bool(operands) and all(shape_arithmetic(a) for a in operands)


def _match_mul(tensors: GraphTensors, node: fx.Node) -> Match | None:
    """A scale (x times a one-element parameter), or a product of feature maps / by a parameter."""
    if any(isinstance(a, fx.Node) and shape_arithmetic(a) for a in node.args):
        return None  # a size, or a map times one: neither keeps a map for the other's gradient
    for position, operand in enumerate(node.args):
        param = tensors.parameter(operand)
        if param is not None and param.numel() == 1:
            problem = "in-place multiply" if node.target is operator.imul else None
            if not isinstance(node.args[1 - position], fx.Node):
                problem = "scale of a constant"
            return Match(node, SCALE, tensors.name(operand), None, problem)
    if all(isinstance(a, fx.Node) and tensors.buffer(a) is None for a in node.args):
        return _kept_function(node, MUL)
    return None


def _match_function(tensors: GraphTensors, node: fx.Node) -> Match | None:
    target = node.target
    if node.op == "call_method" and target in _RELU_METHODS or target in _RELU_FUNCTIONS:
        inplace = target in ("relu_", torch.relu_, F.relu_) or node.kwargs.get("inplace", False)
        return Match(node, RELU, node.name, None, inplace_aliasing(node) if inplace else None)
    if node.op == "call_method" and target in _KEPT_METHODS:
        return _kept_function(node, _KEPT_METHODS[target])
    if node.op != "call_function":
        return None
    if target in _KEPT_FUNCTIONS:
        return _kept_function(node, _KEPT_FUNCTIONS[target])
    if target in _MUL_FUNCTIONS and len(node.args) == 2:
        return _match_mul(tensors, node)
    if target in _MAX_POOL_FUNCTIONS:
        problem = "return_indices=True is not supported" if call_args(node).get("return_indices") else None
        return Match(node, MAX_POOL, node.name, None, problem)
    if target in _DROPOUT_FUNCTIONS:
        problem = inplace_aliasing(node) if call_args(node)["inplace"] else None
        return Match(node, DROPOUT, node.name, None, problem)
    if target in _CONV_FUNCTIONS or target in _LINEAR_FUNCTIONS:
        kind = CONV if target in _CONV_FUNCTIONS else LINEAR
        args = call_args(node)
        weight = args["weight"]
        layer = _owner(tensors.name(weight)) if tensors.parameter(weight) is not None else owner_module(node)
        return Match(node, kind, layer or node.name, None, _weighted_function_problem(tensors, kind, args))
    if target in _BATCH_NORM_FUNCTIONS:
        return _match_batch_norm_function(tensors, node, call_args(node))
    return None


def find_matches(gm: fx.GraphModule, tensors: GraphTensors | None = None) -> list[Match]:
    """Every node of a kind the pass knows, in graph order, with unique layer names.

    A module called twice (torchvision's BasicBlock reuses `self.relu`) gets "name#2" for its
    second call. `tensors` says how the graph reads parameters (default: get_attr nodes of `gm`).
    """
    tensors = tensors or GraphTensors(gm)
    matches: list[Match] = []
    seen: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            match = _match_module(gm, node)
        elif node.op in ("call_function", "call_method"):
            match = _match_function(tensors, node)
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
    """A stateful layer called from several places cannot be swapped for just one of them."""
    calls: dict[object, list[Match]] = {}
    for match in matches:
        if match.kind not in (CONV, LINEAR, BATCH_NORM, DROPOUT):
            continue
        if match.module is not None:
            calls.setdefault(id(match.module), []).append(match)
        elif match.kind != DROPOUT:
            calls.setdefault(match.layer.partition("#")[0], []).append(match)
    for shared in calls.values():
        if len(shared) > 1:
            for match in shared:
                match.unsupported = f"module is called {len(shared)} times; shared layers stay dense"
