"""Pictures of what Facto saves (matplotlib, an optional extra: pip install "facto-fx[plots]")."""

from __future__ import annotations

from pathlib import Path

from facto_fx.report import MemoryReport, MiB


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise RuntimeError('plots need matplotlib: pip install "facto-fx[plots]"') from error
    return plt


def plot_memory_breakdown(report: MemoryReport, path: str | Path, title: str = "") -> Path:
    """Saved bytes by op kind, vanilla vs Facto, as stacked bars (like the paper's Figure 6)."""
    plt = _pyplot()
    kinds = sorted({r.op for r in report.rows})
    totals = {
        side: [sum(getattr(r, f"{side}_bytes") for r in report.rows if r.op == k) / MiB for k in kinds]
        for side in ("vanilla", "facto")
    }
    fig, ax = plt.subplots(figsize=(5, 4))
    for side, x in (("vanilla", 0), ("facto", 1)):
        bottom = 0.0
        for kind, value in zip(kinds, totals[side], strict=True):
            ax.bar(x, value, bottom=bottom, color=plt.cm.tab10(kinds.index(kind) % 10), label=kind if x == 0 else None)
            bottom += value
        ax.text(x, bottom, f"{bottom:.1f} MiB", ha="center", va="bottom")
    ax.set_xticks([0, 1], ["vanilla", f"facto ({100 * report.ratio:.1f} %)"])
    ax.set_ylabel("saved for backward (MiB)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
