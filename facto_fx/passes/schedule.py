"""The scheduler: which matched layers to compress, and why (paper §4.2).

Conv, scale and batch-norm layers are ordered by their depth from the graph input (the longest
path, in nodes, on a networkx view of the FX graph); the input layer is never compressed, and the
first ceil(apply_ratio · n) of the rest are. Linear layers follow the same switch: one is
compressed when no uncompressed conv / scale / batch-norm layer lies before it. ReLU, max-pool and
dropout masks are binarised everywhere. Users override with include / exclude / layer_filter.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import networkx as nx
from torch import fx

from facto_fx.config import FactoConfig
from facto_fx.passes.match import BATCH_NORM, LINEAR, LOW_RANK_KINDS, ORDERED_KINDS, Match


@dataclass
class Decision:
    """The scheduler's verdict on one layer: rewrite it or not, and the reason, for reports."""

    layer: str
    kind: str
    node: str
    depth: int
    compress: bool
    reason: str
    unsupported: bool = False
    rewritten: bool = False
    excluded: bool = False  # by exclude / layer_filter: left exactly as it is (batch-norm not even frozen)


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """The FX graph's data flow as a DiGraph of node names."""
    dag = nx.DiGraph()
    for node in graph.nodes:
        dag.add_node(node.name, op=node.op, target=str(node.target))
        for user in node.users:
            dag.add_edge(node.name, user.name)
    return dag


def depths(dag: nx.DiGraph) -> dict[str, int]:
    """Longest-path distance (in nodes) of every node from the graph's inputs."""
    depth: dict[str, int] = {}
    for name in nx.topological_sort(dag):
        preds = list(dag.predecessors(name))
        depth[name] = 1 + max((depth[p] for p in preds), default=-1)
    return depth


def input_layers(dag: nx.DiGraph, matches: list[Match]) -> set[str]:
    """Conv / linear nodes with no conv / linear node upstream: they see the data itself."""
    weighted = {m.node.name for m in matches if m.kind in LOW_RANK_KINDS}
    return {name for name in weighted if not (nx.ancestors(dag, name) & weighted)}


def _check_names(config: FactoConfig, matches: list[Match]) -> None:
    known = [m.layer for m in matches]
    for arg in ("include", "exclude"):
        for name in getattr(config, arg):
            if name not in known:
                close = difflib.get_close_matches(name, known, n=3)
                hint = f"; did you mean {close}?" if close else ""
                raise ValueError(f"{arg} names '{name}', which is not a layer the pass can rewrite{hint}")


def _override(config: FactoConfig, match: Match) -> tuple[bool, str] | None:
    if match.layer in config.include:
        return True, "included by name"
    if match.layer in config.exclude:
        return False, "excluded by name"
    if config.layer_filter is not None and not config.layer_filter(match.layer, match.module):
        return False, "excluded by layer_filter"
    return None


def schedule(gm: fx.GraphModule, matches: list[Match], config: FactoConfig) -> list[Decision]:
    """One Decision per match, in graph order."""
    _check_names(config, matches)
    dag = to_networkx(gm.graph)
    depth = depths(dag)
    inputs = input_layers(dag, matches)
    for match in matches:
        if match.node.name in inputs and match.layer in config.include:
            raise ValueError(f"include names '{match.layer}', the input layer, which is never compressed")

    ordered = sorted(
        (m for m in matches if m.kind in ORDERED_KINDS and m.unsupported is None
         and m.node.name not in inputs and not _batch_stats(m.kind, config)),
        key=lambda m: depth[m.node.name],
    )
    chosen = {m.node.name for m in ordered[: math.ceil(config.apply_ratio * len(ordered))]}

    decisions = [_decide(m, depth[m.node.name], config, inputs, chosen, ordered) for m in matches]
    # A linear layer is compressed only when every conv / scale / batch-norm before it is,
    # whatever made those dense (apply_ratio, exclude, an unsupported form).
    dense_depths = [
        d.depth for d in decisions
        if d.kind in ORDERED_KINDS and not d.compress and d.node not in inputs and not _batch_stats(d.kind, config)
    ]
    cutoff = min(dense_depths, default=math.inf)
    for d, m in zip(decisions, matches, strict=True):
        if d.kind == LINEAR and not d.unsupported and d.node not in inputs and _override(config, m) is None:
            d.compress = d.depth < cutoff
            d.reason = "all earlier conv layers compressed" if d.compress else "an earlier conv layer is dense"
    return decisions


def _batch_stats(kind: str, config: FactoConfig) -> bool:
    """Batch-norm kept in training mode (batch statistics): not a Facto layer at all."""
    return kind == BATCH_NORM and config.batch_norm == "train"


def _decide(
    m: Match, depth: int, config: FactoConfig, inputs: set[str], chosen: set[str], ordered: list[Match]
) -> Decision:
    batch_stats = _batch_stats(m.kind, config)
    override = _override(config, m)
    if m.unsupported is not None:
        compress, reason = False, m.unsupported
    elif batch_stats:
        compress, reason = False, "batch_norm='train': left in training mode"
    elif m.node.name in inputs:
        compress, reason = False, "input layer: never compressed (paper §4.2)"
    elif override is not None:
        compress, reason = override
    elif m.kind in ORDERED_KINDS:
        compress = m.node.name in chosen
        verdict = "within" if compress else "beyond"
        reason = f"#{ordered.index(m) + 1} of {len(ordered)} from the input, {verdict} apply_ratio={config.apply_ratio}"
    elif m.kind == LINEAR:
        compress, reason = False, "decided after the conv layers"
    elif config.binarize_activations:
        compress, reason = True, "mask stored as packed bits"
    else:
        compress, reason = False, "binarize_activations=False"
    excluded = override is not None and not override[0]
    unsupported = m.unsupported is not None or batch_stats
    return Decision(m.layer, m.kind, m.node.name, depth, compress, reason, unsupported, excluded=excluded)
