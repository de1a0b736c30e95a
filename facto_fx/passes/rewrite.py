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
from facto_fx.passes.match import BATCH_NORM, CONV, DROPOUT, LINEAR, MAX_POOL, RELU, SCALE, Match
from facto_fx.passes.schedule import Decision

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


def _rewrite_one(gm: fx.GraphModule, match: Match, decision: Decision, config: FactoConfig) -> bool:
    kind, module, node = match.kind, match.module, match.node
    k, dtype = config.lossy_kernel, config.storage_dtype
    if kind == BATCH_NORM and config.batch_norm == "freeze" and match.unsupported is None:
        lossy, store = (k, dtype) if decision.compress else (1, None)
        _set_submodule(gm, node.target, FactoBatchNorm(module, lossy, store))
        return True
    if not decision.compress:
        return False
    seed = layer_seed(config.seed, match.layer)
    if kind == CONV:
        rank = config.rank(module.in_channels)
        _set_submodule(gm, node.target, FactoConv2d(module, rank, k, dtype, seed))
    elif kind == LINEAR:
        _set_submodule(gm, node.target, FactoLinear(module, config.rank(module.in_features), dtype, seed))
    elif kind == DROPOUT:
        _set_submodule(gm, node.target, FactoDropout(module.p))
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
        by_node[node.name].reason += f"; moved after {by_node[pool.name].layer} (max commutes with ReLU)"


def rewrite(gm: fx.GraphModule, matches: list[Match], decisions: list[Decision], config: FactoConfig) -> None:
    """Apply the scheduler's decisions to `gm` in place and mark each decision `rewritten`."""
    for match, decision in zip(matches, decisions, strict=True):
        decision.rewritten = _rewrite_one(gm, match, decision, config)
    pool_before_relu(gm, decisions)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
