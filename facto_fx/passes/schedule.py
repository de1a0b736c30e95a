"""The scheduler: which method each matched layer gets, and why (docs/design.md §4).

A layer's method is chosen in this order:
1. its exact name: `methods={"layer1.0.conv1": ...}`, `include` (the default Facto method) or
   `exclude` (dense); then `layer_filter` returning False (dense);
2. the first pattern (fnmatch glob), Last(n) (the last n conv layers, counted from the output in
   execution order) or filter function in `methods`, in the mapping's order, whose method takes
   layers of this kind (None takes every kind);
3. apply_ratio (paper §4.2): conv, scale and batch-norm layers are ordered by their depth from the
   graph input (the longest path, in nodes, on a networkx view of the FX graph); the input layer
   is never compressed, and the first ceil(apply_ratio · n) of the rest get Facto. A linear layer
   gets Facto when no conv / scale / batch-norm layer before it is dense; ReLU, max-pool and
   dropout get packed masks everywhere; batch-norm beyond the ratio is frozen at full resolution.
A method that cannot take a layer says why: for a name that is an error, for a pattern or the
default the layer stays dense with that reason.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from dataclasses import dataclass

import networkx as nx
from torch import fx

from facto_fx.config import FactoConfig
from facto_fx.matches import ACTIVATION, BATCH_NORM, CONV, LINEAR, LOW_RANK_KINDS, MUL, NORM, ORDERED_KINDS, Match
from facto_fx.methods import (
    FewBitActivation,
    FixedRate,
    FrozenBatchNorm,
    Last,
    MethodConfig,
    PackedMasks,
    PlanContext,
    method_handler,
)
from facto_fx.methods.fewbit import is_exact, keeps_output


@dataclass
class Decision:
    """The scheduler's verdict on one layer: its method (None: dense) and the reason, for reports."""

    layer: str
    kind: str
    node: str
    depth: int
    method: MethodConfig | None
    reason: str
    unsupported: bool = False
    rewritten: bool = False
    excluded: bool = False  # chosen dense by name, pattern or filter: left exactly as it is
    wrapper: MethodConfig | None = None  # a method that holds what the rewritten op saves (the fallback)
    region: MethodConfig | None = None  # a method that runs the layer within a chain of layers (row strips)

    @property
    def compress(self) -> bool:
        """Whether the layer's method saves memory (frozen batch-norm at full size does not)."""
        return self.method is not None and (self.method.saves_memory or self.wrapper is not None)

    @property
    def methods(self) -> list[MethodConfig]:
        """The method, then the wrapper around it, where there are."""
        return [m for m in (self.method, self.wrapper) if m is not None]

    @property
    def label(self) -> str:
        """The methods that act on the layer, for reports ("dense" when none)."""
        names = [m.label for m in self.methods] if self.rewritten else []
        names += [self.region.label] if self.region is not None else []
        return "+".join(names) or "dense"


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


LINEAR_PENDING = "decided after the conv layers"


def _is_pattern(key: str) -> bool:
    return any(c in key for c in "*?[")


def _check_names(config: FactoConfig, matches: list[Match]) -> None:
    """Every name must be a layer; every pattern must match a layer its method can take."""
    known = [m.layer for m in matches]
    named = [("include", n) for n in config.include] + [("exclude", n) for n in config.exclude]
    named += [("methods", k) for k in config.methods if isinstance(k, str) and not _is_pattern(k)]
    for arg, name in named:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(f"{arg} names '{name}', which is not a layer the pass can rewrite{hint}")
    for key, method in config.methods.items():
        if isinstance(key, str) and _is_pattern(key):
            hits = [m for m in matches if fnmatch.fnmatchcase(m.layer, key)]
            if not any(_takes(method, m.kind) for m in hits):
                close = difflib.get_close_matches(key, known, n=3)
                what = f"no {'/'.join(sorted(method_handler(method).kinds))} layer" if hits else "no layer"
                hint = f"; close layer names: {close}" if close else ""
                raise ValueError(f"methods pattern '{key}' matches {what} the pass can rewrite{hint}")


def _takes(method: MethodConfig | None, kind: str) -> bool:
    return method is None or kind in method_handler(method).kinds


def _by_name(
    config: FactoConfig, match: Match, default: MethodConfig | None
) -> tuple[MethodConfig | None, str] | None:
    """(method, reason) chosen for this layer by its exact name, or None."""
    if match.layer in config.methods:
        method = config.methods[match.layer]
        if not _takes(method, match.kind):
            kinds = ", ".join(sorted(method_handler(method).kinds))
            raise ValueError(
                f"methods['{match.layer}'] is {type(method).__name__}, which takes {kinds} layers; "
                f"'{match.layer}' is a {match.kind}"
            )
        return method, f"{type(method).__name__ if method else 'dense'} by name"
    if match.layer in config.include:
        return default, "included by name"
    if match.layer in config.exclude:
        return None, "excluded by name"
    if config.layer_filter is not None and not config.layer_filter(match.layer, match.module):
        return None, "excluded by layer_filter"
    return None


def last_layers(matches: list[Match], selector: Last) -> set[str]:
    """Node names of the last `selector.n` supported layers of its kinds, in execution order."""
    chosen = [m.node.name for m in matches if m.kind in selector.kinds and m.unsupported is None]
    return set(chosen[-selector.n :])


def _by_pattern(
    config: FactoConfig, match: Match, last: dict[Last, set[str]]
) -> tuple[MethodConfig | None, str] | None:
    """(method, reason) from the first pattern, Last(n) or filter function that applies, or None."""
    for key, method in config.methods.items():
        if isinstance(key, str) and not _is_pattern(key) or not _takes(method, match.kind):
            continue
        if isinstance(key, str):
            hit, source = fnmatch.fnmatchcase(match.layer, key), f"pattern '{key}'"
        elif isinstance(key, Last):
            hit, source = match.node.name in last[key], f"Last({key.n})"
        else:
            hit, source = key(match.layer, match.module), f"filter {getattr(key, '__name__', key)}"
        if hit:
            return method, f"{type(method).__name__ if method else 'dense'} by {source}"
    return None


def _batch_stats(match: Match, config: FactoConfig) -> str | None:
    """Why a batch-norm stays torch's (batch statistics, input saved whole), if it does: only a
    method that wraps it whole applies."""
    if match.kind == BATCH_NORM and config.batch_norm == "train":
        return "batch_norm='train': left in training mode"
    return None


def _torch_batch_norm(config: FactoConfig) -> MethodConfig | None:
    """What a batch-norm Facto does not take becomes: frozen (the trace froze it) or torch's."""
    return FrozenBatchNorm() if config.batch_norm == "freeze" else None


def _wraps_whole(chosen: tuple[MethodConfig | None, str] | None) -> bool:
    """Whether a chosen method keeps the op as it is (batch statistics and all)."""
    return chosen is not None and chosen[0] is not None and method_handler(chosen[0]).wraps_op


class _Planner:
    """One pass over the matches: explicit choices first, then apply_ratio for the rest."""

    def __init__(self, gm: fx.GraphModule, matches: list[Match], config: FactoConfig) -> None:
        self.config = config
        dag = to_networkx(gm.graph)
        self.depth = depths(dag)
        self.inputs = input_layers(dag, matches)
        self.low_rank = config.low_rank()
        self.masks = PackedMasks() if config.binarize_activations else None
        # What apply_ratio counts: supported conv / scale / batch-norm layers Facto could take.
        self.ordered = sorted(
            (m for m in matches if m.kind in ORDERED_KINDS and m.unsupported is None and not self._input(m)
             and not _batch_stats(m, config) and self._refusal(self.low_rank, m) is None),
            key=lambda m: self.depth[m.node.name],
        )
        self.chosen = {m.node.name for m in self.ordered[: math.ceil(config.apply_ratio * len(self.ordered))]}
        self.last = {key: last_layers(matches, key) for key in config.methods if isinstance(key, Last)}

    def _input(self, match: Match) -> bool:
        return match.node.name in self.inputs

    def _refusal(self, method: MethodConfig, match: Match) -> str | None:
        return method_handler(method).refuses(match, method, PlanContext(input_layer=self._input(match)))

    def decide(self, match: Match) -> Decision:
        decision = Decision(match.layer, match.kind, match.node.name, self.depth[match.node.name], None, "")
        default = PackedMasks() if match.kind in method_handler(PackedMasks()).kinds else self.low_rank
        explicit = _by_name(self.config, match, default)
        problem = match.unsupported
        chosen = explicit
        kept_training = _batch_stats(match, self.config) if problem is None else None
        if kept_training:
            chosen = explicit or _by_pattern(self.config, match, self.last)
            if not _wraps_whole(chosen):
                problem = kept_training
        if problem is not None:
            if explicit is not None and explicit[0] is not None:
                raise ValueError(f"'{match.layer}' ({explicit[1]}) cannot be rewritten: {problem}")
            decision.reason, decision.unsupported = problem, True
            decision.excluded = chosen is not None  # dense by name, pattern or filter: no fallback either
            return decision
        if explicit is not None:
            method, decision.reason = explicit
            refusal = method and self._refusal(method, match)
            if refusal:
                raise ValueError(f"{type(method).__name__} refuses '{match.layer}' ({decision.reason}): {refusal}")
            decision.method, decision.excluded = method, method is None
            return decision
        chosen = _by_pattern(self.config, match, self.last)
        if chosen is not None:
            method, decision.reason = chosen
            refusal = method and self._refusal(method, match)
            if refusal:
                decision.reason, decision.unsupported = f"{decision.reason} refused: {refusal}", True
                return decision
            decision.method, decision.excluded = method, method is None
            return decision
        return self._default(match, decision)

    def fall_back(self, match: Match, decision: Decision) -> None:
        """Give config.fallback a layer the plan left as it is by default, if it takes it; a
        fallback that wraps ops also wraps a rewrite that saves no memory (frozen batch-norm at
        full size), holding what that op saves."""
        method = self.config.fallback
        if decision.excluded or match.unsupported is not None:
            return
        if not _takes(method, match.kind) or self._refusal(method, match):
            return
        name = type(method).__name__
        if decision.method is None:
            decision.method, decision.unsupported = method, False
            decision.reason = f"{name} as the fallback ({decision.reason})"
        elif not decision.method.saves_memory and method_handler(method).wraps_op:
            decision.wrapper = method
            decision.reason += f"; what it saves held by {name} (the fallback)"

    def _code_activation(self, match: Match, decision: Decision) -> None:
        """The default for an activation no Facto operator covers: a few-bit code of its derivative,
        1 bit where that is exact (with the masks), config.activation_bits elsewhere; left as it is,
        with why, where neither applies, the method refuses it, or it keeps its output (which the
        layer after it keeps too: a code would add to it)."""
        decision.reason, decision.unsupported = match.kept, True
        if keeps_output(match):
            decision.reason = (f"{match.layer} keeps its output, which the layer after it keeps too: a code would "
                               "add to it (FewBitActivation by name codes it)")
            return
        exact = is_exact(match)
        bits = (1 if self.masks is not None else None) if exact else self.config.activation_bits
        if bits is None:
            return
        method = FewBitActivation(bits)
        refusal = self._refusal(method, match)
        if refusal:
            decision.reason = f"{match.kept}; no few-bit code: {refusal}"
            return
        decision.method, decision.unsupported = method, False
        decision.reason = "derivative in 1 bit (exact)" if exact else f"derivative in {bits} bits (few-bit backward)"

    def _store(self, match: Match, decision: Decision) -> None:
        """Give a layer Facto leaves (a grouped conv it refuses, a product of feature maps, a layer or
        group norm) the fixed-rate store at config.store_bits, where it is set and the method takes
        the layer."""
        if self.config.store_bits is None:
            return
        method = FixedRate(self.config.store_bits)
        if self._refusal(method, match):
            return
        decision.method, decision.unsupported = method, False
        decision.reason = f"{decision.reason}; kept in {method.bits} bits per element (store_bits)"

    def _default(self, match: Match, decision: Decision) -> Decision:
        if match.kind == ACTIVATION:
            self._code_activation(match, decision)
            return decision
        if match.kept is not None:
            decision.reason, decision.unsupported = match.kept, True
            if match.kind in (MUL, NORM):
                self._store(match, decision)
            return decision
        if self._input(match):
            decision.reason = "input layer: never compressed (paper §4.2)"
            return decision
        if match.kind in ORDERED_KINDS:
            refusal = self._refusal(self.low_rank, match)
            if refusal:
                decision.reason, decision.unsupported = refusal, True
                if match.kind == BATCH_NORM:
                    decision.method = _torch_batch_norm(self.config)
                elif match.kind == CONV:
                    self._store(match, decision)
                return decision
            within = match.node.name in self.chosen
            verdict = "within" if within else "beyond"
            decision.reason = (
                f"#{self.ordered.index(match) + 1} of {len(self.ordered)} from the input, "
                f"{verdict} apply_ratio={self.config.apply_ratio}"
            )
            if within:
                decision.method = self.low_rank
            elif match.kind == BATCH_NORM:
                decision.method = _torch_batch_norm(self.config)
            return decision
        if match.kind == LINEAR:
            decision.reason = LINEAR_PENDING
            return decision
        if self.masks is None:
            decision.reason = "binarize_activations=False"
            return decision
        refusal = self._refusal(self.masks, match)
        if refusal:
            decision.reason, decision.unsupported = refusal, True
        else:
            decision.method, decision.reason = self.masks, "mask stored as packed bits"
        return decision


def schedule(
    gm: fx.GraphModule, matches: list[Match], config: FactoConfig, *, check_names: bool = True
) -> list[Decision]:
    """One Decision per match, in graph order. check_names=False skips the check that every name
    and pattern the config gives is a layer of this graph (one piece of a model dynamo split)."""
    if check_names:
        _check_names(config, matches)
    planner = _Planner(gm, matches, config)
    decisions = [planner.decide(m) for m in matches]
    # A linear layer left to the default gets Facto only when every conv / scale / batch-norm before
    # it saves memory, whatever made those dense (apply_ratio, exclude, an unsupported form).
    dense_depths = [
        d.depth for m, d in zip(matches, decisions, strict=True)
        if d.kind in ORDERED_KINDS and not d.compress and d.node not in planner.inputs
        and not _batch_stats(m, config)
    ]
    cutoff = min(dense_depths, default=math.inf)
    for d in decisions:
        if d.kind == LINEAR and d.reason == LINEAR_PENDING:
            d.method = planner.low_rank if d.depth < cutoff else None
            d.reason = "all earlier conv layers compressed" if d.method else "an earlier conv layer is dense"
    if config.fallback is not None:
        for match, d in zip(matches, decisions, strict=True):
            planner.fall_back(match, d)
    return decisions
