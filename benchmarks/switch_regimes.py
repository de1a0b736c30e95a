"""Does Facto keep up with vanilla from any switch point? The issue's three regimes, several seeds,
two data sets.

    python benchmarks/switch_regimes.py                                  # digits and mnist5k, 3 seeds
    python benchmarks/switch_regimes.py --data digits --seeds 0 --regimes paper

The CIFAR-size VGG11 (with batch-norm) trains full-rank with SGD (momentum 0.9, weight decay 5e-4,
batch 64, learning rate 0.05), then goes on either plain (vanilla) or compiled for Facto the way the
README's quickstart does it (INR 0.3, lossy kernel 2, apply ratio 1.0, batch-norm on batch
statistics with x̂ saved pooled, compile's default, M at low_rank_lr times the rate, merging every
epoch, W decayed by lr·weight decay); `--batch-norm freeze` recalibrates the statistics on 8
training batches and freezes them, `--batch-norm train` leaves batch-norm as torch's. Both continue
from the same weights with a fresh optimizer on the same schedule and data order:

    paper: 3 full-rank epochs of 10, learning rate x0.1 at the switch (the paper's regime)
    same:  1 full-rank epoch of 6, the same learning rate throughout
    drop:  1 full-rank epoch of 6, learning rate x0.1 at the switch

Test accuracy at the end, per seed and as the mean over seeds, with facto's gap to vanilla in points.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics

import torch
from digits_runs import accuracy, run_epochs, run_low_rank_epochs
from torch.utils.data import DataLoader

import facto_fx
from facto_fx.config import BATCH_NORM_MODES, FactoConfig
from facto_fx.methods.facto import SCALES
from facto_fx.models import MODELS
from facto_fx.training import TrainConfig
from facto_fx.training.data import load_splits

LR, WEIGHT_DECAY, BATCH = 0.05, 5e-4, 64
REGIMES = {"paper": (3, 10, 0.1), "same": (1, 6, 1.0), "drop": (1, 6, 0.1)}  # full-rank epochs, epochs, LR factor
TARGETS = {"paper": 0.5, "same": 1.0, "drop": 3.0}  # the largest gap, in points


def batches(data, seed: int) -> DataLoader:
    """Batches of 64 in an order that depends only on `seed`: vanilla and facto see the same ones."""
    return DataLoader(data.train, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed))


def sgd(params, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=WEIGHT_DECAY)


def continue_vanilla(model, loader, lr: float, count: int) -> None:
    run_epochs(model, loader, sgd(model.parameters(), lr), count)


def continue_facto(model, loader, lr: float, count: int, calibration: list, facto: argparse.Namespace):
    fmodel = facto_fx.compile(model, inr=0.3, lossy_kernel=2, apply_ratio=1.0, calibration_data=calibration,
                              batch_norm=facto.batch_norm, scale=facto.scale)
    run_low_rank_epochs(fmodel, loader, lr, count, WEIGHT_DECAY, facto.low_rank_lr)
    return fmodel


def one_seed(data, seed: int, regimes: list[str], facto: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Each regime's final test accuracies, vanilla and facto, from one full-rank run of this seed."""
    torch.manual_seed(seed)
    model = MODELS["cifar_vgg11_bn"](num_classes=data.num_classes)
    loader = batches(data, seed)
    optimizer, trained, snapshots = sgd(model.parameters(), LR), 0, {}
    for frt in sorted({REGIMES[r][0] for r in regimes}):  # one full-rank run, a snapshot at each switch
        run_epochs(model, loader, optimizer, frt - trained)
        trained, snapshots[frt] = frt, copy.deepcopy(model)
    results = {}
    for regime in regimes:
        frt, epochs, factor = REGIMES[regime]
        lr, rest = LR * factor, epochs - frt
        vanilla = copy.deepcopy(snapshots[frt])
        continue_vanilla(vanilla, batches(data, seed + 1), lr, rest)
        calibration = list(itertools.islice(batches(data, seed + 2), 8))  # its own order: training's stays vanilla's
        fmodel = continue_facto(copy.deepcopy(snapshots[frt]), batches(data, seed + 1), lr, rest, calibration,
                                facto)
        results[regime] = {"vanilla": accuracy(vanilla, data), "facto": accuracy(fmodel, data),
                           "switch": accuracy(snapshots[frt], data)}
        print(f"  seed {seed} {regime:5s}: at the switch {results[regime]['switch']:.4f}, "
              f"vanilla {results[regime]['vanilla']:.4f}, facto {results[regime]['facto']:.4f}", flush=True)
    return results


def main(argv: list[str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["digits", "mnist5k"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES))
    parser.add_argument("--batch-norm", choices=BATCH_NORM_MODES, default=FactoConfig.batch_norm,
                        help="Facto's batch-norm (compile's batch_norm; its default by default)")
    parser.add_argument("--scale", choices=SCALES, default=FactoConfig.scale, help="compile's scale of D's rows")
    parser.add_argument("--low-rank-lr", type=float, default=TrainConfig.low_rank_lr, help="M's rate x the others'")
    args = parser.parse_args(argv)
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for name in args.data:
        print(f"{name}:", flush=True)
        data = load_splits(name)
        runs = [one_seed(data, seed, args.regimes, args) for seed in args.seeds]
        summary[name] = {}
        for regime in args.regimes:
            mean = {key: statistics.fmean(run[regime][key] for run in runs) for key in ("vanilla", "facto")}
            mean["gap"] = 100 * (mean["vanilla"] - mean["facto"])
            summary[name][regime] = mean
    print(f"\nmean over seeds {args.seeds} (gap = vanilla - facto, points; target: at most the issue's)")
    print(f"{'data':8s} {'regime':6s} {'vanilla':>8s} {'facto':>8s} {'gap':>6s} {'target':>6s}")
    for name, regimes in summary.items():
        for regime, mean in regimes.items():
            print(f"{name:8s} {regime:6s} {mean['vanilla']:8.4f} {mean['facto']:8.4f} {mean['gap']:6.2f} "
                  f"{TARGETS[regime]:6.1f}")
    return summary


if __name__ == "__main__":
    main()
