"""The rewriter: swap matched modules for Facto layers and retarget functional nodes.

Nodes are edited in place, so node names (and therefore report rows) stay the same as in the
plain trace, and swapped modules keep their qualified names, so parameters keep readable names.
"""

from __future__ import annotations

import zlib

from torch import fx, nn

from facto_fx import ops
from facto_fx.config import FactoConfig
from facto_fx.layers import FactoBatchNorm, FactoConv2d, FactoDropout, FactoLinear
from facto_fx.passes.match import BATCH_NORM, CONV, DROPOUT, LINEAR, MAX_POOL, RELU, SCALE, Match, arg
from facto_fx.passes.schedule import Decision

MOVED = "facto_moved"  # node.meta key of nodes whose values the rewrite changed on purpose (reordering)
_MAX_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
_MAX_POOL_DEFAULTS = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False}


def layer_seed(seed: int, layer: str) -> int:
    """Seed of a layer's D: the same on every process and every run with the same config."""
    return seed * 2**32 + zlib.crc32(layer.encode())


def _set_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def functional_max_pool_kwargs(node: fx.Node) -> dict:
    """The keyword arguments of facto max_pool2d for an F.max_pool2d call node."""
    values = dict(_MAX_POOL_DEFAULTS)
    values.update(zip(_MAX_POOL_ARGS, node.args[1:], strict=False))
    values.update({k: v for k, v in node.kwargs.items() if k in _MAX_POOL_ARGS})
    return values


def _max_pool_kwargs(match: Match) -> dict:
    if match.module is not None:
        return {name: getattr(match.module, name) for name in _MAX_POOL_ARGS}
    return functional_max_pool_kwargs(match.node)


def _to_function(node: fx.Node, function, args: tuple, kwargs: dict | None = None) -> None:
    node.op = "call_function"
    node.target = function
    node.args = args
    node.kwargs = kwargs or {}


def _install(gm: fx.GraphModule, node: fx.Node, layer: nn.Module) -> None:
    """Replace a functional conv / linear with a call of `layer`, placed where its weight's module was.

    The matcher made sure nothing else in the graph reads that module.
    """
    weight, bias = arg(node, 1, "weight"), arg(node, 2, "bias")
    path = weight.target.rpartition(".")[0]
    _set_submodule(gm, path, layer)
    node.op, node.target, node.args, node.kwargs = "call_module", path, (node.args[0],), {}
    for reader in (weight, bias):
        if reader is not None and not reader.users:
            gm.graph.erase_node(reader)


def _low_rank_layer(gm: fx.GraphModule, match: Match, config: FactoConfig, seed: int) -> nn.Module:
    """The FactoConv2d / FactoLinear for a matched module or functional call."""
    module, node, k, dtype = match.module, match.node, config.lossy_kernel, config.storage_dtype
    if module is not None:
        if match.kind == CONV:
            return FactoConv2d.from_conv(module, config.rank(module.in_channels), k, dtype, seed)
        return FactoLinear.from_linear(module, config.rank(module.in_features), dtype, seed)
    weight = gm.get_parameter(arg(node, 1, "weight").target)
    bias_node = arg(node, 2, "bias")
    bias = gm.get_parameter(bias_node.target) if bias_node is not None else None
    rank = config.rank(weight.shape[1])
    if match.kind == CONV:
        stride, padding, dilation = arg(node, 3, "stride", 1), arg(node, 4, "padding", 0), arg(node, 5, "dilation", 1)
        return FactoConv2d(weight, bias, stride, padding, dilation, rank, k, dtype, seed)
    return FactoLinear(weight, bias, rank, dtype, seed)


def _freeze_batch_norm(gm: fx.GraphModule, match: Match, lossy: int, store) -> None:
    node = match.node
    if match.module is not None:
        _set_submodule(gm, node.target, FactoBatchNorm(match.module, lossy, store))
        return
    x, mean, var, weight, bias = (
        arg(node, i, name) for i, name in enumerate(("input", "running_mean", "running_var", "weight", "bias"))
    )
    kwargs = {"eps": arg(node, 7, "eps", 1e-5), "lossy_kernel": lossy, "storage_dtype": store}
    _to_function(node, ops.batch_norm, (x, mean, var, weight, bias), kwargs)


def _rewrite_one(gm: fx.GraphModule, match: Match, decision: Decision, config: FactoConfig) -> bool:
    kind, module, node = match.kind, match.module, match.node
    k, dtype = config.lossy_kernel, config.storage_dtype
    if kind == BATCH_NORM and config.batch_norm == "freeze" and match.unsupported is None and not decision.excluded:
        lossy, store = (k, dtype) if decision.compress else (1, None)
        _freeze_batch_norm(gm, match, lossy, store)
        return True
    if not decision.compress:
        return False
    if kind in (CONV, LINEAR):
        layer = _low_rank_layer(gm, match, config, layer_seed(config.seed, match.layer))
        if module is not None:
            _set_submodule(gm, node.target, layer)
        else:
            _install(gm, node, layer)
    elif kind == DROPOUT:
        if module is not None:
            _set_submodule(gm, node.target, FactoDropout(module.p))
        else:
            _to_function(node, ops.dropout, (node.args[0], arg(node, 1, "p", 0.5), arg(node, 2, "training", True)))
    elif kind == RELU:
        _to_function(node, ops.relu, (node.args[0],))
    elif kind == MAX_POOL:
        _to_function(node, ops.max_pool2d, (node.args[0],), _max_pool_kwargs(match))
    elif kind == SCALE:
        x, s = node.args if getattr(node.args[1], "op", None) == "get_attr" else node.args[::-1]
        _to_function(node, ops.scale, (x, s), {"lossy_kernel": k, "storage_dtype": dtype})
    else:
        return False
    return True


def pool_before_relu(gm: fx.GraphModule, decisions: list[Decision]) -> None:
    """max_pool(relu(x)) -> relu(max_pool(x)) where the ReLU feeds only the pool.

    Max commutes with the monotone ReLU, so outputs and gradients are identical, and the ReLU's
    mask is stored at the pooled size (a quarter of the bits for a 2x2 pool).
    """
    by_node = {d.node: d for d in decisions}
    for node in list(gm.graph.nodes):
        if node.target is not ops.relu or len(node.users) != 1:
            continue
        pool = next(iter(node.users))
        if pool.target is not ops.max_pool2d or pool.args[0] is not node:
            continue
        pool.args = (node.args[0], *pool.args[1:])
        pool.replace_all_uses_with(node)
        node.args = (pool,)
        pool.append(node)
        node.meta[MOVED] = pool.meta[MOVED] = True
        by_node[node.name].reason += f"; moved after {by_node[pool.name].layer} (max commutes with ReLU)"


def rewrite(gm: fx.GraphModule, matches: list[Match], decisions: list[Decision], config: FactoConfig) -> None:
    """Apply the scheduler's decisions to `gm` in place and mark each decision `rewritten`."""
    for match, decision in zip(matches, decisions, strict=True):
        decision.rewritten = _rewrite_one(gm, match, decision, config)
    pool_before_relu(gm, decisions)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
