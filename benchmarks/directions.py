"""Gaussian vs orthonormal D after an early switch: does low-rank training keep up with vanilla?

    python benchmarks/directions.py

The issue's hardest regime on scikit-learn's digits: the CIFAR-size VGG11 trains one full-rank
epoch (SGD, momentum 0.9, weight decay 5e-4), then five more at a tenth of the learning rate, either
plain (vanilla) or compiled for Facto (INR 0.3, lossy kernel 2, apply ratio 1.0, merging every
epoch) with D drawn each way. Test accuracy at the end, per seed and mean.
"""

from __future__ import annotations

import argparse
import copy

import torch
from digits_runs import accuracy, mean_over, run_epochs, run_low_rank_epochs
from torch.utils.data import DataLoader

import facto_fx
from facto_fx.models import cifar_vgg11
from facto_fx.training.data import load_digits_splits

LR, WEIGHT_DECAY = 0.05, 5e-4


def facto_run(model, loader, data, direction: str, lr: float, count: int) -> float:
    fmodel = facto_fx.compile(model, inr=0.3, lossy_kernel=2, apply_ratio=1.0, direction=direction)
    run_low_rank_epochs(fmodel, loader, lr, count, WEIGHT_DECAY)
    return accuracy(fmodel, data)


def one_seed(data, seed: int, after: int) -> dict[str, float]:
    torch.manual_seed(seed)
    model = cifar_vgg11(num_classes=10)
    loader = DataLoader(data.train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    run_epochs(model, loader, torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=WEIGHT_DECAY), 1)
    lr = LR / 10
    result = {}
    vanilla = copy.deepcopy(model)
    torch.manual_seed(seed + 1)
    run_epochs(vanilla, loader, torch.optim.SGD(vanilla.parameters(), lr=lr, momentum=0.9, weight_decay=WEIGHT_DECAY),
               after)
    result["vanilla"] = accuracy(vanilla, data)
    for direction in ("gaussian", "orthonormal"):
        torch.manual_seed(seed + 1)
        result[f"facto {direction}"] = facto_run(copy.deepcopy(model), loader, data, direction, lr, after)
    print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()), flush=True)
    return result


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--after", type=int, default=5, help="epochs after the switch")
    args = parser.parse_args(argv)
    data = load_digits_splits(32)
    runs = [one_seed(data, seed, args.after) for seed in args.seeds]
    mean = mean_over(runs)
    print(f"\nmean over seeds {args.seeds}: " + ", ".join(f"{k} {v:.4f}" for k, v in mean.items()))
    return mean


if __name__ == "__main__":
    main()
