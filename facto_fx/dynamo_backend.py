"""The "facto" torch.compile backend: the Facto pass on the graphs dynamo captures.

    compiled = torch.compile(model, backend="facto", options={"inr": 0.3, "apply_ratio": 1.0})

Dynamo hands over graphs where parameters are inputs and layers are functions (torch.conv2d,
linear, relu, max_pool2d, batch_norm, a multiply by a scalar parameter); unlike symbolic_trace it
splits a model at data-dependent Python control flow instead of failing, and each piece is
rewritten on its own (apply_ratio and the input-layer rule apply per piece). A conv or linear
weight gets its low-rank state (M, D) the first time it is compiled, kept for the weight's lifetime
and shared by recompilations; run one forward pass before building the optimizer, then take
`low_rank_parameters(model)` (or all parameters: W gets no gradient). Merges update W, M and D in
place, so `attach` works without recompiling. The rewritten graph then goes to inductor.
"""

from __future__ import annotations

import dataclasses
import operator
import re

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils.weak import WeakIdKeyDictionary

from facto_fx import ops
from facto_fx.config import FactoConfig
from facto_fx.layers import LowRankMixin
from facto_fx.passes.match import BATCH_NORM, CONV, DROPOUT, LINEAR, MAX_POOL, RELU, SCALE, Match, arg, inplace_aliasing
from facto_fx.passes.rewrite import functional_max_pool_kwargs, layer_seed
from facto_fx.passes.schedule import schedule

_CONV = {torch.conv2d, F.conv2d}
_LINEAR = {torch._C._nn.linear, F.linear}
_RELU = {torch.relu, F.relu, torch.relu_}
_MAX_POOL = {F.max_pool2d, torch.max_pool2d}


class LowRankState(LowRankMixin, nn.Module):
    """M and D of one frozen weight compiled by the backend; merge / redraw as in FactoConv2d."""

    def __init__(self, weight: nn.Parameter, rank: int, seed: int) -> None:
        super().__init__()
        # The weight belongs to the user's model and is already a graph input: kept unregistered
        # so the compiled graph does not lift it a second time. It gets no gradient from Facto ops.
        self.__dict__["weight"] = weight
        self._init_low_rank(weight, rank, weight[0].numel(), seed)


_STATES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def low_rank_states(model: nn.Module) -> list[LowRankState]:
    """The backend's low-rank states for `model`'s weights (empty before its first compiled call)."""
    return [_STATES[p] for p in model.parameters() if p in _STATES]


def low_rank_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every M the backend created for `model`: what an optimizer of a compiled model must see."""
    return [state.M for state in low_rank_states(model)]


def _qualified_name(placeholder: fx.Node) -> str:
    """'L_self_modules_features_modules_0_parameters_weight_' -> 'features.0.weight'."""
    name = str(placeholder.target)
    match = re.search(r"_(modules|parameters|buffers)_", name)
    path = name[match.start() + 1 :] if match else name
    parts = re.split(r"_modules_|_parameters_|_buffers_|^modules_|^parameters_|^buffers_", path)
    return ".".join(p for p in parts if p).rstrip("_")


def _find_matches(gm: fx.GraphModule, params: dict[fx.Node, Tensor]) -> list[Match]:
    matches = []
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_function" and target in _CONV and arg(node, 1, "weight") in params:
            weight = arg(node, 1, "weight")
            groups, padding = arg(node, 6, "groups", 1), arg(node, 4, "padding", 0)
            problem = f"grouped convolution (groups={groups}) is not supported" if groups != 1 else None
            if isinstance(padding, str):
                problem = f"padding='{padding}' is not supported"
            matches.append(Match(node, CONV, _qualified_name(weight).removesuffix(".weight"), None, problem))
        elif node.op == "call_function" and target in _LINEAR and arg(node, 1, "weight") in params:
            matches.append(Match(node, LINEAR, _qualified_name(node.args[1]).removesuffix(".weight")))
        elif (node.op == "call_function" and target in _RELU) or (node.op == "call_method" and target == "relu"):
            inplace = target is torch.relu_ or node.kwargs.get("inplace", False)
            matches.append(Match(node, RELU, node.name, None, inplace_aliasing(node) if inplace else None))
        elif node.op == "call_function" and target in _MAX_POOL:
            problem = "return_indices=True is not supported" if arg(node, 6, "return_indices") else None
            matches.append(Match(node, MAX_POOL, node.name, None, problem))
        elif node.op == "call_function" and target in (operator.mul, torch.mul) and len(node.args) == 2:
            scalar = [a for a in node.args if a in params and params[a].numel() == 1]
            if scalar:
                matches.append(Match(node, SCALE, _qualified_name(scalar[0])))
        elif node.op == "call_function" and target is F.batch_norm and arg(node, 1, "running_mean") in params:
            matches.append(Match(node, BATCH_NORM, _qualified_name(node.args[1]).removesuffix(".running_mean")))
        elif node.op == "call_function" and target is F.dropout:
            problem = "in-place dropout is not supported" if arg(node, 3, "inplace") else None
            matches.append(Match(node, DROPOUT, node.name, None, problem))
    return matches


def _low_rank_node(gm: fx.GraphModule, node: fx.Node, weight: nn.Parameter, rank: int, seed: int, extra: list):
    """Placeholders for the weight's M and D, appended as extra graph inputs.

    They are inputs, not attributes: dynamo-captured graphs only accept parameters it traced itself.
    """
    state = _STATES.get(weight)
    if state is None:
        with unset_fake_temporarily(), torch.no_grad():  # real tensors that outlive this compilation
            state = _STATES[weight] = LowRankState(weight, rank, seed)
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        d = gm.graph.placeholder(f"facto_D_{len(extra)}")
    with gm.graph.inserting_after(last):
        m = gm.graph.placeholder(f"facto_M_{len(extra)}")
    extra.append(state)
    return m, d


def _rewrite(
    gm: fx.GraphModule, match: Match, params: dict[fx.Node, Tensor], config: FactoConfig, extra: list
) -> None:
    node, k, dtype = match.node, config.lossy_kernel, config.storage_dtype
    seed = layer_seed(config.seed, match.layer)
    if match.kind == CONV:
        x, w = node.args[0], arg(node, 1, "weight")
        m, d = _low_rank_node(gm, node, params[w], config.rank(params[w].shape[1]), seed, extra)
        stride, padding, dilation = (arg(node, i, n, v) for i, n, v in ((3, "stride", 1), (4, "padding", 0),
                                                                          (5, "dilation", 1)))
        node.target = ops.conv2d
        node.args = (x, w, m, d, arg(node, 2, "bias"), stride, padding, dilation, k, dtype)
        node.kwargs = {}
    elif match.kind == LINEAR:
        x, w = node.args[0], node.args[1]
        m, d = _low_rank_node(gm, node, params[w], config.rank(params[w].shape[1]), seed, extra)
        node.target, node.args, node.kwargs = ops.linear, (x, w, m, d, arg(node, 2, "bias"), dtype), {}
    elif match.kind == RELU:
        node.op, node.target, node.args, node.kwargs = "call_function", ops.relu, (node.args[0],), {}
    elif match.kind == MAX_POOL:
        node.target, node.args, node.kwargs = ops.max_pool2d, (node.args[0],), functional_max_pool_kwargs(node)
    elif match.kind == SCALE:
        x, s = node.args if node.args[1] in params else node.args[::-1]
        node.target, node.args = ops.scale, (x, s)
        node.kwargs = {"lossy_kernel": k, "storage_dtype": dtype}
    elif match.kind == BATCH_NORM:
        x, mean, var, weight, bias = (arg(node, i, n) for i, n in enumerate(
            ("input", "running_mean", "running_var", "weight", "bias")))
        node.target, node.args = ops.batch_norm, (x, mean, var, weight, bias, arg(node, 7, "eps", 1e-5))
        node.kwargs = {"lossy_kernel": k, "storage_dtype": dtype}
    elif match.kind == DROPOUT:
        node.target = ops.dropout
        node.args, node.kwargs = (node.args[0], arg(node, 1, "p", 0.5), arg(node, 2, "training", True)), {}


def rewrite_captured(gm: fx.GraphModule, example_inputs: list, config: FactoConfig) -> list[LowRankState]:
    """Apply the Facto pass to one dynamo graph in place.

    Returns the low-rank states whose (M, D) the graph now takes as extra trailing inputs.
    """
    extra: list[LowRankState] = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params = {
        n: v for n, v in zip(placeholders, example_inputs, strict=False)
        if isinstance(v, Tensor) and re.search(r"_(parameters|buffers)_", str(n.target))
    }
    matches = _find_matches(gm, params)
    decisions = schedule(gm, matches, config)
    for match, decision in zip(matches, decisions, strict=True):
        train_bn = match.kind == BATCH_NORM and config.batch_norm == "train"
        if match.unsupported is None and not train_bn and (
            decision.compress or match.kind == BATCH_NORM and not decision.excluded
        ):
            if match.kind == BATCH_NORM and not decision.compress:
                _rewrite(gm, match, params, dataclasses.replace(config, lossy_kernel=1, storage_dtype=None), extra)
            else:
                _rewrite(gm, match, params, config, extra)
            decision.rewritten = True
    gm.graph.lint()
    gm.recompile()
    gm.meta["facto_decisions"] = decisions
    return extra


def facto_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None):
    """torch.compile backend: rewrite the captured graph, then compile it with inductor."""
    from torch._inductor.compile_fx import compile_fx

    config = FactoConfig(**(options or {}))
    # Rewrite a copy: dynamo keeps reading its own graph after the backend returns. The copy is a
    # fresh GraphModule, so inductor treats the extra M / D inputs as plain runtime inputs.
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    gm = fx.GraphModule(gm, graph)
    states = rewrite_captured(gm, example_inputs, config)
    extra = [t for state in states for t in (state.M, state.D)]
    # M and D enter as fakes with static shapes: symbolic sizes would add guards on tensors dynamo
    # never saw.
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    extra_examples = [fake_mode.from_tensor(t, static_shapes=True) if fake_mode else t for t in extra]
    compiled = compile_fx(gm, [*example_inputs, *extra_examples])

    def run(*args):
        return compiled(*args, *extra)

    return run


def register(name: str = "facto") -> None:
    """Make backend="facto" available once facto_fx is imported.

    When torch itself imports facto_fx through the `torch_dynamo_backends` entry point, it
    registers the function right after; registering here too would be a duplicate.
    """
    from torch._dynamo.backends import registry

    if name not in registry._COMPILER_FNS and registry._BACKENDS.get(name) is None:
        registry.register_backend(facto_backend, name=name)
