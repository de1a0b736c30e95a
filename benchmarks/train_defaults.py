"""`facto-fx train`'s default schedule on every kind of model it accepts, against vanilla.

    python benchmarks/train_defaults.py                          # the defaults, five models, digits
    python benchmarks/train_defaults.py --epochs 3 --frt-epochs 1 --lr 0.01
    python benchmarks/train_defaults.py --models cifar_vgg11 resnet18 --seeds 0 1 2
    python benchmarks/train_defaults.py --models resnet18 --seeds 0 1 2 --dataset mnist5k

Each model trains twice on the same seed and learning rates: Facto after at least `frt_epochs`
full-rank epochs (`--switch auto`, the default, waits while the full-rank loss is above half of
chance, ln 10 / 2 = 1.15; the default's learning-rate drop comes where Facto starts), and vanilla
full-rank throughout, its rate dropped at the epoch that Facto run started at. The table gives
the final test accuracies (mean and per seed) and their gap, the epochs Facto started after, and
the training loss there.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
from collections.abc import Sequence

from facto_fx.training import TrainConfig, train

MODELS = ("cifar_vgg11", "cifar_vgg11_bn", "fixup_resnet18", "resnet18", "mobilenet_v2")


def run(model: str, seed: int, options: dict, vanilla_of: int | None = None) -> tuple[float, float, int]:
    """Final test accuracy, the training loss of the last full-rank epoch, and how many there were.
    `vanilla_of`: train full-rank throughout, on the learning rates of a Facto run that started
    after that many epochs."""
    config = TrainConfig(model=model, seed=seed, progress=False, **options)
    if vanilla_of is not None:
        drops = config.milestones_for(vanilla_of)
        config = dataclasses.replace(config, frt_epochs=config.epochs, lr_milestones=drops or None)
    with tempfile.TemporaryDirectory() as out:
        result = train(dataclasses.replace(config, out=out))
    full_rank = sum(r.phase == "full-rank" for r in result.history)
    return result.test_accuracy, result.history[max(full_rank, 1) - 1].train_loss, full_rank


def _listed(values: list[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--frt-epochs", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--switch", choices=["auto", "fixed"], default=None)
    parser.add_argument("--dataset", default=None, help="digits (the default) or mnist5k")
    args = parser.parse_args(argv)
    options = {k: v for k, v in {"epochs": args.epochs, "frt_epochs": args.frt_epochs, "lr": args.lr,
                                 "switch": args.switch, "dataset": args.dataset}.items() if v is not None}
    defaults = TrainConfig(**options)
    print(f"{defaults.dataset}, {defaults.epochs} epochs, {defaults.frt_epochs} full-rank (switch {defaults.switch}), "
          f"lr {defaults.lr} (x{defaults.lr_gamma} at {list(defaults.milestones)}, or where Facto starts), "
          f"seeds {args.seeds}")
    results = {}
    for model in args.models:
        facto = [run(model, seed, options) for seed in args.seeds]
        vanilla = [run(model, seed, options, vanilla_of=epochs)
                   for seed, (_, _, epochs) in zip(args.seeds, facto, strict=True)]
        results[model] = {
            "facto": statistics.mean(a for a, _, _ in facto), "vanilla": statistics.mean(a for a, _, _ in vanilla),
            "switch_loss": statistics.mean(loss for _, loss, _ in facto),
            "switch_epochs": [epochs for _, _, epochs in facto],
            "facto_seeds": [a for a, _, _ in facto], "vanilla_seeds": [a for a, _, _ in vanilla],
        }
        r = results[model]
        print(f"{model:<16} facto {r['facto']:.3f}  vanilla {r['vanilla']:.3f}  gap {r['facto'] - r['vanilla']:+.3f}"
              f"  Facto after epoch {r['switch_epochs']} at loss {r['switch_loss']:.2f}"
              f"  (per seed: facto {_listed(r['facto_seeds'])}, vanilla {_listed(r['vanilla_seeds'])})", flush=True)
    return results


if __name__ == "__main__":
    main()
