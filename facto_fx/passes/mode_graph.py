"""One graph for a forward that computes differently in train and eval mode.

torch.fx records one path through a forward. Where the root module's own forward takes another
path in training (torchvision's googlenet and inception_v3 run auxiliary heads and return a
namedtuple only in training), the tracer traces both modes and merges the two graphs into one
(`merge_modes`): a node both modes compute appears once, a node of one mode only is marked with
that mode (`node.meta[ONLY]`), and the eval-mode result is held by an `eval_result` node. Every
later pass (match, plan, rewrite, verify) works on that one graph, so each layer is matched,
planned and rewritten once, and both modes call the same modules with the same parameters.

The generated forward runs the nodes of the mode the model is in (`TwoModeCodeGen`): when
`self.training` is False it returns the eval nodes' function. A node a pass adds after the merge
runs in each mode where all its inputs run. An interpreter over the graph (memory counts, shape
propagation) runs every node: the train graph plus the eval-only nodes.
"""

from __future__ import annotations

import itertools
import linecache
from collections.abc import Callable, Iterable

import torch
from torch import fx
from torch.fx.graph import CodeGen, PythonCode

ONLY = "facto_only_in"  # node.meta key: True for a node of the train graph only, False for eval only
_sources = itertools.count()


@torch.fx.node.has_side_effect
def eval_result(value: object) -> object:
    """Marks what the forward returns in eval mode; the train graph's output is the graph's own."""
    return value


def merge_modes(train: fx.Graph, evaluation: fx.Graph, pairs: dict[fx.Node, fx.Node]) -> None:
    """Make `train` the graph of both modes: add the eval nodes that `pairs` (eval node -> the
    train node computing the same) leaves unpaired, each where the eval graph has it, and the eval
    result; mark the nodes of one mode; generate the forward with `TwoModeCodeGen`."""
    paired = set(pairs.values())
    for node in train.nodes:
        if node not in paired and node.op != "output":
            node.meta[ONLY] = True
    # Each eval-only node goes right before the train node paired with the next paired eval node.
    anchors, anchor = {}, train.output_node()
    for node in reversed(evaluation.nodes):
        if node in pairs:
            anchor = pairs[node]
        anchors[node] = anchor
    copies = dict(pairs)
    for node in evaluation.nodes:
        if node.op == "output":
            with train.inserting_before(train.output_node()):
                result = train.call_function(eval_result, (fx.map_arg(node.args[0], copies.__getitem__),))
            result.meta[ONLY] = False
        elif node not in pairs:
            with train.inserting_before(anchors[node]):
                copies[node] = train.node_copy(node, copies.__getitem__)
            copies[node].meta[ONLY] = False
    train.set_codegen(TwoModeCodeGen())


def two_modes(graph: fx.Graph) -> bool:
    """Whether `graph` runs other nodes in train mode than in eval mode."""
    return any(ONLY in node.meta for node in graph.nodes)


def _in_mode(nodes: Iterable[fx.Node], training: bool) -> list[fx.Node]:
    """The nodes that run in the given mode, in order: those marked with it, the output in
    training, and unmarked nodes whose inputs all run in it."""
    kept: dict[fx.Node, None] = {}
    for node in nodes:
        only = node.meta.get(ONLY, True if node.op == "output" else None)
        if only == training if only is not None else all(i in kept for i in node.all_input_nodes):
            kept[node] = None
    return list(kept)


def same_mode(node: fx.Node, *added: fx.Node) -> None:
    """Mark nodes a pass adds for `node` to run in the modes `node` runs in (needed where they
    have a side effect and no input from `node`, such as a batch count)."""
    if ONLY in node.meta:
        for new in added:
            new.meta[ONLY] = node.meta[ONLY]


def _eval_graph(nodes: list[fx.Node]) -> fx.Graph:
    """A graph of the eval-mode nodes, returning the eval result."""
    graph, env, result = fx.Graph(), {}, None
    for node in _in_mode(nodes, False):
        if node.target is eval_result:
            result = node.args[0]
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(fx.map_arg(result, env.__getitem__))
    return graph


def _function(code: PythonCode) -> Callable:
    """The function `code` defines, with its source registered for tracebacks."""
    name = f"<facto eval forward {next(_sources)}>"
    linecache.cache[name] = (len(code.src), None, code.src.splitlines(keepends=True), name)
    scope = dict(code.globals)
    exec(compile(code.src, name, "exec"), scope)
    return scope["forward"]


class TwoModeCodeGen(CodeGen):
    """Python for a merged graph: the forward's body runs the train nodes, after a first line that
    returns the eval nodes' function (a global of the code) when `self.training` is False."""

    def __init__(self) -> None:
        super().__init__()
        self._dispatch = ""

    def _gen_python_code(self, nodes, root_module: str, namespace, **options) -> PythonCode:
        nodes = list(nodes)
        evaluate = _function(_eval_graph(nodes).python_code(root_module))
        name = namespace.create_name("eval_forward", evaluate)
        inputs = ", ".join([root_module, *(str(n.target) for n in nodes if n.op == "placeholder")])
        self._dispatch = f"    if not {root_module}.training:\n        return {name}({inputs})"
        code = super()._gen_python_code(_in_mode(nodes, True), root_module, namespace, **options)
        code.globals[name] = evaluate
        return code

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, *, expanded_def: bool = False) -> str:
        head = super().gen_fn_def(free_vars, maybe_return_annotation, expanded_def=expanded_def)
        return f"{head}\n{self._dispatch}"
