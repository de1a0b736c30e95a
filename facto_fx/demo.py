"""`facto-fx demo`: vanilla vs Facto training of the CIFAR-size VGG on scikit-learn's digits.

Both runs share the seed, data order and learning-rate schedule; they differ only in what happens
after the full-rank epochs: the vanilla run keeps training every weight, the Facto run compiles
the model and trains W + M·D with compressed feature maps and merges.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from facto_fx.presets import method_description
from facto_fx.training import TrainConfig, TrainResult, train


@dataclass
class DemoResult:
    vanilla: TrainResult
    facto: TrainResult
    plots: list[Path]


def run_demo(config: TrainConfig, out: str | Path, plots: bool = True) -> DemoResult:
    """Train `config` as given (Facto) and with frt_epochs = epochs (vanilla); print and plot both."""
    if config.frt_epochs >= config.epochs:
        raise ValueError(f"the demo needs Facto epochs: frt_epochs ({config.frt_epochs}) < epochs ({config.epochs})")
    # The vanilla run never switches, so it takes the Facto run's schedule explicitly.
    facto_config = dataclasses.replace(config, lr_milestones=config.milestones, out=None, resume=False)
    vanilla_config = dataclasses.replace(facto_config, frt_epochs=config.epochs)
    print(f"1/2 vanilla: {config.model} on {config.dataset}, {config.epochs} full-rank epochs")
    vanilla = train(vanilla_config)
    also = method_description(config.method, config.eps, config.last, config.eb, config.sigma,
                                config.strips, config.strip_mode)
    print(f"\n2/2 facto: {config.frt_epochs} full-rank epoch(s), then Facto (INR {config.inr}, "
          f"lossy kernel {config.lossy_kernel}, apply ratio {config.apply_ratio}{also})")
    facto = train(facto_config)
    report = facto.report
    if report is None:  # --switch auto waited to the end: both runs were full-rank
        raise RuntimeError("the demo's Facto run never left full-rank training (--switch auto waited for the loss "
                           "to fall below half of chance), so there is nothing to compare: pass --switch fixed, "
                           "or more --epochs")
    print(f"\nfeature maps saved for backward, batch {config.batch_size}:\n\n{report}\n")
    print(f"{'':<8} {'test accuracy':>14} {'saved MiB':>10}")
    print(f"{'vanilla':<8} {vanilla.test_accuracy:>14.4f} {report.vanilla_bytes / 2**20:>10.3f}")
    print(f"{'facto':<8} {facto.test_accuracy:>14.4f} {report.facto_bytes / 2**20:>10.3f}"
          f"   ({100 * report.ratio:.1f} % of vanilla, {facto.history[-1].merges} merges)")
    written = _plot(vanilla, facto, Path(out)) if plots else []
    for path in written:
        print(f"plot: {path}")
    return DemoResult(vanilla, facto, written)


def _plot(vanilla: TrainResult, facto: TrainResult, out: Path) -> list[Path]:
    from facto_fx.plots import plot_layer_memory, plot_layer_ratios, plot_training_curves

    return [
        plot_layer_memory(facto.report, out / "memory_per_layer.png"),
        plot_layer_ratios(facto.report, out / "compression_per_layer.png"),
        plot_training_curves({"vanilla": vanilla.history, "facto": facto.history}, out / "training_curves.png"),
    ]
