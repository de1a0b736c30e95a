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
    return _save(fig, plt, path)


def plot_layer_memory(report: MemoryReport, path: str | Path, title: str = "") -> Path:
    """Saved bytes layer by layer, each charged to the layer whose output it keeps (the report's
    rows), vanilla beside Facto, coloured by op kind (paper Figure 6)."""
    plt = _pyplot()
    kinds = sorted({r.op for r in report.rows})
    colours = {k: plt.cm.tab10(i % 10) for i, k in enumerate(kinds)}
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(report.rows)), 4))
    for i, row in enumerate(report.rows):
        ax.bar(i - 0.2, row.vanilla_bytes / MiB, 0.4, color=colours[row.op], alpha=0.35)
        ax.bar(i + 0.2, row.facto_bytes / MiB, 0.4, color=colours[row.op])
    for kind in kinds:
        ax.bar(0, 0, color=colours[kind], label=kind)
    ax.set_xticks(range(len(report.rows)), [r.layer for r in report.rows], rotation=90, fontsize="small")
    ax.set_ylabel("saved for backward (MiB)")
    ax.set_title(title or f"per layer: vanilla (pale) vs facto, {100 * report.ratio:.1f} % in total")
    ax.legend(fontsize="small", ncol=2)
    return _save(fig, plt, path)


def plot_layer_ratios(report: MemoryReport, path: str | Path, title: str = "") -> Path:
    """How many times smaller what each rewritten layer's own backward keeps is than vanilla's,
    coloured by method (Facto's pooled maps, ErrorBounded's codes, ...); log scale."""
    plt = _pyplot()
    rows = [r for r in report.rows if r.decision not in ("-", "dense") and r.facto_own_bytes and r.vanilla_own_bytes]
    methods = sorted({r.decision for r in rows})
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(rows)), 4))
    ratios = [r.vanilla_own_bytes / r.facto_own_bytes for r in rows]
    ax.bar(range(len(rows)), ratios, color=[colours[r.decision] for r in rows])
    for method in methods:
        ax.bar(0, 0, color=colours[method], label=method)
    ax.axhline(1, color="grey", linewidth=1)
    ax.set_xticks(range(len(rows)), [r.layer for r in rows], rotation=90, fontsize="small")
    ax.set(yscale="log", ylabel="vanilla bytes / saved bytes")
    ax.set_title(title or "compression per layer")
    ax.legend(fontsize="small")
    return _save(fig, plt, path)


def plot_training_curves(histories: dict, path: str | Path) -> Path:
    """Train loss and test accuracy per epoch for each named run (lists of EpochRecord)."""
    plt = _pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, history in histories.items():
        epochs = [r.epoch for r in history]
        loss_ax.plot(epochs, [r.train_loss for r in history], marker="o", label=name)
        acc_ax.plot(epochs, [r.test_accuracy for r in history], marker="o", label=name)
        switch = next((r.epoch - 0.5 for r in history if r.phase == "facto"), None)
        if switch is not None:
            for ax in (loss_ax, acc_ax):
                ax.axvline(switch, color="grey", linestyle=":", linewidth=1)
    loss_ax.set(xlabel="epoch", ylabel="train loss", yscale="log")
    acc_ax.set(xlabel="epoch", ylabel="test accuracy")
    acc_ax.legend(fontsize="small")
    fig.suptitle("dotted line: low-rank (Facto) training starts")
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
