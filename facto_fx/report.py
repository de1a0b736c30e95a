"""The per-layer memory table: layer, op, decision, vanilla bytes, Facto bytes."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from facto_fx.passes.schedule import Decision

MiB = 2**20


@dataclass
class Row:
    layer: str
    op: str
    decision: str
    vanilla_bytes: int
    facto_bytes: int
    input_bytes: int = 0  # the layer's input, counted even where an earlier node saved it first


@dataclass
class MemoryReport:
    """Saved-for-backward bytes of one forward pass, per layer and in total."""

    rows: list[Row]
    unrewritten: list[Decision]
    vanilla_by_node: dict[str, int]
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
        head = f"{'layer':<{width}}  {'op':<11} {'decision':<10} {'vanilla MiB':>12} {'facto MiB':>10}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.layer:<{width}}  {r.op:<11} {r.decision:<10} "
                f"{r.vanilla_bytes / MiB:>12.3f} {r.facto_bytes / MiB:>10.3f}"
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


def build_report(
    decisions: list[Decision], vanilla_gm: fx.GraphModule, vanilla: dict[str, int], facto: dict[str, int],
    inputs: dict[str, int] | None = None, regions: dict[str, str] | None = None,
) -> MemoryReport:
    """Join per-node byte counts (node names match between the two graphs) into table rows;
    `regions` names the nodes that run a region of layers (row strips), which only Facto has."""
    by_node = {d.node: d for d in decisions}
    rows = []
    for node in vanilla_gm.graph.nodes:
        v, f = vanilla.get(node.name, 0), facto.get(node.name, 0)
        d = by_node.get(node.name)
        if d is None and v == 0 and f == 0:
            continue
        if d is None:
            op = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            rows.append(Row(node.name, str(op)[:11], "-", v, f))
        else:
            rows.append(Row(d.layer, d.kind, d.label, v, f, (inputs or {}).get(node.name, 0)))
    stray = set(facto) - {n.name for n in vanilla_gm.graph.nodes}
    rows.extend(Row(name, "region" if name in (regions or {}) else "?", "-", 0, facto[name]) for name in sorted(stray))
    unrewritten = [d for d in decisions if d.unsupported]
    return MemoryReport(rows, unrewritten, vanilla, facto)
