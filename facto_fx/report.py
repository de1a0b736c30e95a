"""The per-layer memory table: layer, op, decision, vanilla bytes, Facto bytes."""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass, field

from torch import fx

from facto_fx.matches import target_name
from facto_fx.memory import Saved, first_saves
from facto_fx.passes.schedule import Decision

MiB = 2**20
HEADING = (
    "Saved for backward, by the layer whose output it is: vanilla keeps each output once for all the layers "
    "that need it; under Facto each layer in 'kept for' keeps its own form of it (a code, a mask, a pooled map)."
)


@dataclass
class Row:
    """One layer's output map as kept for backward, vanilla and under the plan, charged to the layer
    that produced it in both columns (so the columns add up to the totals), and what the layer's
    own backward keeps."""

    layer: str
    op: str
    decision: str
    vanilla_bytes: int  # the layer's output as vanilla keeps it: once, however many layers need it
    facto_bytes: int  # the forms of that output the plan keeps: each needing layer's code, mask or map
    kept_for: tuple[str, ...] = ()  # the layers whose backward keeps a form of it under the plan
    vanilla_own_bytes: int = 0  # what the layer's own backward keeps in vanilla, shared maps in full
    facto_own_bytes: int = 0  # what it keeps under the plan: its method's form
    input_bytes: int = 0  # the layer's input, counted even where an earlier node saved it first


@dataclass
class MemoryReport:
    """Saved-for-backward bytes of one forward pass, per layer and in total."""

    rows: list[Row]
    unrewritten: list[Decision]
    vanilla_by_node: dict[str, int]  # the rows' figures per FX node, by the node whose output was kept
    facto_by_node: dict[str, int]
    vanilla_peak: int | None = None  # peak bytes of one forward + backward (report(..., peak=True))
    facto_peak: int | None = None
    notes: dict[str, str] = field(default_factory=dict)  # per layer, from its method (HOSVD: the ranks)

    @property
    def vanilla_bytes(self) -> int:
        return sum(r.vanilla_bytes for r in self.rows)

    @property
    def facto_bytes(self) -> int:
        return sum(r.facto_bytes for r in self.rows)

    @property
    def ratio(self) -> float:
        return self.facto_bytes / self.vanilla_bytes if self.vanilla_bytes else float("nan")

    def __str__(self) -> str:
        width = max([len(r.layer) for r in self.rows] + [5])
        head = f"{'layer':<{width}}  {'op':<11} {'decision':<10} {'vanilla MiB':>12} {'facto MiB':>10}  kept for"
        lines = [HEADING, head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.layer:<{width}}  {r.op:<11} {r.decision:<10} "
                f"{r.vanilla_bytes / MiB:>12.3f} {r.facto_bytes / MiB:>10.3f}  {', '.join(r.kept_for)}"
            )
        lines.append("-" * len(head))
        lines.append(
            f"{'total':<{width}}  {'':<11} {'':<10} {self.vanilla_bytes / MiB:>12.3f} "
            f"{self.facto_bytes / MiB:>10.3f}   ({100 * self.ratio:.2f} % of vanilla)"
        )
        if self.vanilla_peak is not None and self.facto_peak is not None:
            lines.append(
                f"peak of a forward + backward: vanilla {self.vanilla_peak / MiB:.3f} MiB, facto "
                f"{self.facto_peak / MiB:.3f} MiB   ({100 * self.facto_peak / self.vanilla_peak:.2f} % of vanilla)"
            )
        if self.notes:
            lines.append("\nper layer:")
            lines.extend(f"  {layer}: {note}" for layer, note in self.notes.items())
        if self.unrewritten:
            lines.append("\nleft unrewritten:")
            lines.extend(f"  {d.layer} ({d.kind}): {d.reason}" for d in self.unrewritten)
        return "\n".join(lines)


def _stand_ins(records: list[Saved]) -> dict[str, str]:
    """Per saving node, the producer of the first node output it saved: the map that what it makes
    itself (a code, a mask, a statistic) stands for."""
    stand_ins: dict[str, str] = {}
    for r in records:
        if r.producer is not None:
            stand_ins.setdefault(r.saver, r.producer)
    return stand_ins


def _owner(r: Saved, stand_ins: dict[str, str]) -> str:
    return r.producer or stand_ins.get(r.saver, r.saver)


def _by_producer(records: list[Saved], stand_ins: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for r in first_saves(records):
        counts[_owner(r, stand_ins)] += r.nbytes
    return dict(counts)


def _by_saver(records: list[Saved]) -> dict[str, int]:
    """What each node's own backward keeps, a storage it shares with another node counted in full."""
    counts: dict[str, int] = defaultdict(int)
    for saver, group in itertools.groupby(sorted(records, key=lambda r: r.saver), key=lambda r: r.saver):
        counts[saver] = sum({r.key: r.nbytes for r in group}.values())
    return dict(counts)


def build_report(
    decisions: list[Decision], vanilla_gm: fx.GraphModule, vanilla: list[Saved], facto: list[Saved],
    inputs: dict[str, int] | None = None, regions: dict[str, str] | None = None,
) -> MemoryReport:
    """Join the saved tensors of the two runs (node names match between the two graphs) into rows.

    Each saved tensor is charged to the node whose output it is; one a node made itself is charged
    where vanilla's node of that name charged the map it saved, so a Facto conv's code lands on the
    row of the map the dense conv kept. `regions` names the nodes that run a region of layers (row
    strips), which only Facto has.
    """
    stand_ins = _stand_ins(vanilla)
    vanilla_maps, facto_maps = _by_producer(vanilla, stand_ins), _by_producer(facto, stand_ins)
    vanilla_own, facto_own = _by_saver(vanilla), _by_saver(facto)
    by_node = {d.node: d for d in decisions}
    layer = {d.node: d.layer for d in decisions}
    kept_for: dict[str, dict[str, None]] = defaultdict(dict)
    for r in facto:
        kept_for[_owner(r, stand_ins)][layer.get(r.saver, r.saver)] = None
    rows = []
    for node in vanilla_gm.graph.nodes:
        name = node.name
        v, f = vanilla_maps.get(name, 0), facto_maps.get(name, 0)
        d = by_node.get(name)
        if d is None and v == 0 and f == 0:
            continue
        own = {"vanilla_own_bytes": vanilla_own.get(name, 0), "facto_own_bytes": facto_own.get(name, 0)}
        if d is None:
            op = "input" if node.op == "placeholder" else target_name(node.target)
            rows.append(Row(name, op[:11], "-", v, f, tuple(kept_for[name]), **own))
        else:
            rows.append(Row(d.layer, d.kind, d.label, v, f, tuple(kept_for[name]), **own,
                            input_bytes=(inputs or {}).get(name, 0)))
    stray = set(facto_maps) - {n.name for n in vanilla_gm.graph.nodes}
    rows.extend(Row(name, "region" if name in (regions or {}) else "?", "-", 0, facto_maps[name],
                    tuple(kept_for[name]), facto_own_bytes=facto_own.get(name, 0)) for name in sorted(stray))
    unrewritten = [d for d in decisions if d.unsupported]
    return MemoryReport(rows, unrewritten, vanilla_maps, facto_maps)

