"""The README's path at the switch to Facto, with and without batch-norm recalibration.

    python benchmarks/recalibration.py

torchvision resnet18 trains one full-rank epoch on scikit-learn's digits (32², SGD with momentum),
then is compiled for Facto, which freezes its batch-norm statistics. Test accuracy (eval mode):

- dense, as trained: the running statistics as training left them (momentum averages that trail
  weights which moved fast in the first epoch);
- dense, recalibrated: the same weights with statistics re-estimated on 20 training batches (what
  the model computes: the accuracy before compile that counts);
- compiled as is: the README's path without recalibration (M = 0: the same weights);
- compiled, recalibrated: `compile(..., calibration_data=...)` on the same 20 batches.

Means over seeds; the issue asks the recalibrated path to stay within 2 points of before compile.
"""

from __future__ import annotations

import argparse
import copy
import warnings
from itertools import islice

import torch
import torch.nn.functional as F
import torchvision
from digits_runs import accuracy, mean_over
from torch.utils.data import DataLoader

import facto_fx
from facto_fx.training.data import load_digits_splits


def one_seed(data, seed: int, calibration_batches: int) -> dict[str, float]:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = DataLoader(data.train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    model.train()
    for x, y in loader:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    calibration = list(islice(loader, calibration_batches))
    result = {"dense, as trained": accuracy(model, data)}
    dense = copy.deepcopy(model)
    facto_fx.recalibrate_batch_norm(dense, calibration, progress=False)
    result["dense, recalibrated"] = accuracy(dense, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result["compiled as is"] = accuracy(facto_fx.compile(copy.deepcopy(model)), data)
    compiled = facto_fx.compile(copy.deepcopy(model), calibration_data=calibration)
    result["compiled, recalibrated"] = accuracy(compiled, data)
    print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return result


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--calibration-batches", type=int, default=20)
    args = parser.parse_args(argv)
    data = load_digits_splits(32)
    runs = [one_seed(data, seed, args.calibration_batches) for seed in args.seeds]
    mean = mean_over(runs)
    print(f"\nmean over seeds {args.seeds}: " + ", ".join(f"{k} {v:.4f}" for k, v in mean.items()))
    print(f"compiled, recalibrated vs dense, recalibrated (before compile): "
          f"{100 * (mean['compiled, recalibrated'] - mean['dense, recalibrated']):+.2f} points")
    return mean


if __name__ == "__main__":
    main()
