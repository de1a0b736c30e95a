"""Look at a rewritten graph: a readable listing, a networkx graph, DOT and SVG.

Every node carries the scheduler's decision and reason; with example inputs it also carries its
output shape and the bytes it saves for backward, vanilla vs Facto.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

import networkx as nx
from torch import Tensor, fx

from facto_fx.api import decisions, facto_model, graph_nodes, report
from facto_fx.passes.trace import propagate_shapes
from facto_fx.report import MiB


@dataclass
class NodeInfo:
    """One node of the rewritten graph, as a person wants to read it."""

    name: str
    op: str
    target: str
    inputs: list[str]
    layer: str | None = None
    kind: str | None = None
    facto: bool = False
    method: str | None = None  # the method's config class, where one rewrote the node
    reason: str = ""
    shape: tuple[int, ...] | None = None
    vanilla_bytes: int | None = None  # the node's output as kept for backward (the report's rows)
    facto_bytes: int | None = None


def _size(nbytes: int) -> str:
    for unit, scale in (("MiB", MiB), ("KiB", 1024)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def _target_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if isinstance(node.target, str):
        return node.target
    module = getattr(node.target, "__module__", "") or ""
    name = getattr(node.target, "__name__", str(node.target))
    return f"facto.{name}" if module.startswith("facto_fx") else name


class GraphInspection:
    """The rewritten graph node by node; print it, or export it with to_networkx / to_dot / to_svg."""

    def __init__(self, nodes: list[NodeInfo]) -> None:
        self.nodes = nodes

    def __str__(self) -> str:
        lines = []
        for n in self.nodes:
            mark = "*" if n.facto else " "
            shape = "x".join(map(str, n.shape)) if n.shape else ""
            saved = ""
            if n.vanilla_bytes is not None:
                saved = f"output kept {_size(n.vanilla_bytes)} -> {_size(n.facto_bytes)}"
            args = ", ".join(n.inputs)
            lines.append(f"{mark} {n.name:<24} {n.target}({args})  {shape}  {saved}")
            if n.reason:
                lines.append(f"  {'':<24} {n.kind} ({n.method or 'dense'}): {n.reason}")
        lines.append("(* = Facto operator)")
        return "\n".join(lines)

    def to_networkx(self) -> nx.DiGraph:
        """Nodes keyed by name with every NodeInfo field as an attribute."""
        graph = nx.DiGraph()
        for n in self.nodes:
            graph.add_node(n.name, **{k: v for k, v in vars(n).items() if k not in ("name", "inputs")})
            for source in n.inputs:
                graph.add_edge(source, n.name)
        return graph

    def select(self, prefix: str) -> GraphInspection:
        """The nodes of one sub-module (e.g. "layer1.0"), what lies between them, and their inputs."""
        dotted, flat = prefix + ".", prefix.replace(".", "_") + "_"
        inside = {
            n.name for n in self.nodes
            if n.name.startswith(flat) or (n.layer or "").startswith(dotted) or n.target.startswith(dotted)
        }
        if not inside:
            raise ValueError(f"no node belongs to '{prefix}'")
        graph = self.to_networkx()
        between = set().union(*(nx.descendants(graph, v) for v in inside)) & set().union(
            *(nx.ancestors(graph, v) for v in inside)
        )
        keep = inside | between
        keep |= {p for v in keep for p in graph.predecessors(v)}
        return GraphInspection([n for n in self.nodes if n.name in keep])

    def to_dot(self) -> str:
        """Graphviz DOT text: Facto nodes filled, each labelled with its op and its output's saved bytes."""
        names = {n.name for n in self.nodes}
        lines = ["digraph facto {", '  rankdir=TB; node [shape=box, style="rounded,filled", fontname="Helvetica"];']
        for n in self.nodes:
            label = [n.name, n.target]
            if n.shape:
                label.append("x".join(map(str, n.shape)))
            if n.vanilla_bytes is not None and (n.vanilla_bytes or n.facto_bytes):
                label.append(f"output kept {_size(n.vanilla_bytes)} -> {_size(n.facto_bytes)}")
            colour = "#b7e1a1" if n.facto else ("#f4cccc" if n.kind else "#eeeeee")
            text = "\\n".join(s.replace('"', "'") for s in label)
            lines.append(f'  "{n.name}" [label="{text}", fillcolor="{colour}"];')
            lines.extend(f'  "{s}" -> "{n.name}";' for s in n.inputs if s in names)
        lines.append("}")
        return "\n".join(lines)

    def to_svg(self) -> str:
        """SVG rendered by Graphviz's `dot` program (install graphviz to use it)."""
        dot = shutil.which("dot")
        if dot is None:
            raise RuntimeError(
                "to_svg needs Graphviz's `dot` program on PATH (apt install graphviz, brew install graphviz "
                "or conda install graphviz); to_dot() gives the text without it"
            )
        return subprocess.run([dot, "-Tsvg"], input=self.to_dot(), capture_output=True, text=True, check=True).stdout


def inspect(fmodel: fx.GraphModule, *example_inputs: Tensor, analytic: bool = True) -> GraphInspection:
    """The rewritten graph with decisions, reasons and (given example inputs) shapes and saved bytes."""
    fmodel = facto_model(fmodel)
    by_node = {d.node: d for d in decisions(fmodel)}
    vanilla, facto = {}, {}
    if example_inputs:
        table = report(fmodel, *example_inputs, analytic=analytic)  # first: it refuses inputs the model cannot take
        if not any(x.is_meta for x in example_inputs):
            propagate_shapes(fmodel, *example_inputs)
        vanilla, facto = table.vanilla_by_node, table.facto_by_node
    nodes = []
    for node, region in graph_nodes(fmodel):
        d = by_node.get(node.name)
        meta = node.meta.get("tensor_meta")
        info = NodeInfo(
            name=f"{region}/{node.name}" if region else node.name,
            op=node.op,
            target=_target_name(node.graph.owning_module, node),
            inputs=[a.name for a in node.all_input_nodes],
            shape=tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None,
        )
        if d is not None:
            info.layer, info.kind, info.facto, info.reason = d.layer, d.kind, d.rewritten and d.compress, d.reason
            info.method = type(d.method).__name__ if d.rewritten else None
        if example_inputs:
            info.vanilla_bytes, info.facto_bytes = vanilla.get(node.name, 0), facto.get(node.name, 0)
        nodes.append(info)
    return GraphInspection(nodes)


__all__ = ["GraphInspection", "NodeInfo", "inspect"]
