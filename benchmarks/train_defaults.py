"""`facto-fx train`'s default schedule on every kind of model it accepts, against vanilla.

    python benchmarks/train_defaults.py                          # the defaults, five models, digits
    python benchmarks/train_defaults.py --epochs 3 --frt-epochs 1 --lr 0.01
    python benchmarks/train_defaults.py --models cifar_vgg11 resnet18 --seeds 0 1 2

Each model trains twice on the same schedule and seed (the default's learning-rate drop where
Facto starts included): Facto after `frt_epochs` full-rank epochs, and vanilla full-rank
throughout. The table gives the final test accuracies and their gap; the training loss at the
switch shows whether full-rank training had got anywhere before it (chance on ten classes is
ln 10 = 2.30).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
from collections.abc import Sequence

from facto_fx.training import TrainConfig, train

MODELS = ("cifar_vgg11", "cifar_vgg11_bn", "fixup_resnet18", "resnet18", "mobilenet_v2")


def run(model: str, seed: int, vanilla: bool, options: dict) -> tuple[float, float]:
    """Final test accuracy and the training loss of the last full-rank epoch."""
    config = TrainConfig(model=model, seed=seed, progress=False, **options)
    if vanilla:  # the same learning rates, epoch by epoch, without the switch
        config = dataclasses.replace(config, frt_epochs=config.epochs, lr_milestones=config.milestones or None)
    with tempfile.TemporaryDirectory() as out:
        result = train(dataclasses.replace(config, out=out))
    switch = result.history[max(config.frt_epochs, 1) - 1].train_loss
    return result.test_accuracy, switch


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--frt-epochs", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    args = parser.parse_args(argv)
    options = {k: v for k, v in {"epochs": args.epochs, "frt_epochs": args.frt_epochs, "lr": args.lr}.items()
               if v is not None}
    defaults = TrainConfig(**options)
    print(f"digits, {defaults.epochs} epochs, {defaults.frt_epochs} full-rank, lr {defaults.lr} "
          f"(x{defaults.lr_gamma} at {list(defaults.milestones)}), seeds {args.seeds}")
    results = {}
    for model in args.models:
        facto = [run(model, seed, False, options) for seed in args.seeds]
        vanilla = [run(model, seed, True, options) for seed in args.seeds]
        results[model] = {
            "facto": statistics.mean(a for a, _ in facto), "vanilla": statistics.mean(a for a, _ in vanilla),
            "switch_loss": statistics.mean(loss for _, loss in facto),
        }
        r = results[model]
        print(f"{model:<16} facto {r['facto']:.3f}  vanilla {r['vanilla']:.3f}  gap {r['facto'] - r['vanilla']:+.3f}"
              f"  loss at the switch {r['switch_loss']:.2f}", flush=True)
    return results


if __name__ == "__main__":
    main()
