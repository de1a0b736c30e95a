"""The rewriter: apply each layer's method to the graph, through a RewriteSite.

`ModuleSite` is the FX pass's site: layers become submodules of the traced GraphModule, and
functional calls of their ops. Nodes are edited in place, so node names (and therefore report rows)
stay the same as in the plain trace, and swapped modules keep their qualified names, so
parameters keep readable names. The dynamo backend brings its own site; the rest is shared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, fx, nn

from facto_fx import ops
from facto_fx.matches import Match, call_args
from facto_fx.methods import MethodConfig, RewriteSite, method_handler
from facto_fx.passes.match import GraphTensors
from facto_fx.passes.schedule import Decision

MOVED = "facto_moved"  # node.meta key of nodes whose values the rewrite changed on purpose (reordering)


def set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    """Put `module` at the dotted path `target` under `root`."""
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def to_function(node: fx.Node, function: Callable, args: tuple, kwargs: dict) -> None:
    """Make `node` a call_function of `function` in place (its name and users stay)."""
    node.op, node.target, node.args, node.kwargs = "call_function", function, args, kwargs


class ModuleSite:
    """The FX pass's RewriteSite: parameters are get_attr nodes, layers are submodules."""

    def __init__(self, gm: fx.GraphModule, seed: int) -> None:
        self.gm = gm
        self.seed = seed
        self.tensors = GraphTensors(gm)

    def tensor(self, node: object) -> Tensor | None:
        return self.tensors.tensor(node)

    def use_layer(self, match: Match, layer: nn.Module) -> None:
        """Swap a matched module for `layer`; a functional call gets `layer` where its weight's
        module was (the matcher made sure nothing else in the graph reads that module)."""
        node = match.node
        layer.train(self.gm.training if match.module is None else match.module.training)  # the mode it replaces
        if match.module is not None:
            set_submodule(self.gm, node.target, layer)
            return
        args = call_args(node)
        weight, bias = args["weight"], args["bias"]
        path = self.tensors.name(weight).rpartition(".")[0]
        set_submodule(self.gm, path, layer)
        node.op, node.target, node.args, node.kwargs = "call_module", path, (args["input"],), {}
        for reader in (weight, bias):
            if reader is not None and not reader.users:
                self.gm.graph.erase_node(reader)

    def use_function(self, node: fx.Node, function: Callable, args: tuple, kwargs: dict) -> None:
        to_function(node, function, args, kwargs)


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


def rewrite(gm: fx.GraphModule, matches: list[Match], decisions: list[Decision], site: RewriteSite) -> None:
    """Apply each layer's method to `gm` in place through `site`; mark the decisions `rewritten`."""
    for match, decision in zip(matches, decisions, strict=True):
        if decision.method is not None:
            method_handler(decision.method).rewrite(site, match, decision.method)
            decision.rewritten = True
        if decision.wrapper is not None:
            method_handler(decision.wrapper).wrap(site, match.node, match.kind, decision.wrapper)
    pool_before_relu(gm, decisions)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


def rewrite_regions(gm: fx.GraphModule, decisions: list[Decision], methods: Sequence[MethodConfig]) -> dict[str, str]:
    """Apply region methods (row strips) after every layer's rewrite, whose layers they run as
    they are; mark the decisions of the nodes each took; return a note per method, by the node
    that now runs its region (or by the method's label where it took nothing).

    Nothing may delete unused submodules afterwards: the layers a region runs are still the
    model's own, but its graph no longer calls them.
    """
    by_node = {d.node: d for d in decisions}
    notes = {}
    for method in methods:
        taken, node, note = method_handler(method).rewrite_region(gm, method)
        for name in taken:
            if name in by_node:
                by_node[name].region = method
        notes[node or method.label] = note
    gm.graph.lint()
    gm.recompile()
    return notes
