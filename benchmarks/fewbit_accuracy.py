"""Do the few-bit activation codes cost accuracy? resnet18 with SiLU, codes at 2 bits against none.

    python benchmarks/fewbit_accuracy.py --dataset digits --seeds 0 1 2
    python benchmarks/fewbit_accuracy.py --dataset mnist5k_crops --seeds 0 1 2 --jobs 2

The README's regime: full-rank epochs at lr 0.05, then `facto_fx.compile` (calibrated) and Facto
epochs at lr 0.005 with M at 4x, once with `activation_bits=2` (the default) and once with None,
from the same full-rank model and the same data order. torchvision's resnet18 with every ReLU
replaced by SiLU stands in for the SiLU networks (efficientnet_b0 learns these small sets too slowly
on a CPU to compare in minutes). Prints each seed's test accuracies and the mean paired gap.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from torchvision_train import WEIGHT_DECAY, batches, evaluate, facto_optimizer, train_epoch  # noqa: E402

import facto_fx  # noqa: E402
from facto_fx.training.data import load_splits  # noqa: E402

LR = 0.05
RUNS = {"codes 2 bits": 2, "no codes": None}


def silu_resnet18(num_classes: int) -> nn.Module:
    model = torchvision.models.resnet18(num_classes=num_classes)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.SiLU())
    return model


def run(dataset: str, seed: int, frt_epochs: int, facto_epochs: int) -> dict[str, float]:
    """Test accuracy of each run for one seed (one thread: runs go side by side in processes)."""
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    splits = load_splits(dataset, image_size=32)
    train_loader = DataLoader(splits.train, batch_size=64, shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(seed))
    test_loader = DataLoader(splits.test, batch_size=256)
    torch.manual_seed(seed)
    model = silu_resnet18(splits.num_classes)
    device = torch.device("cpu")
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=WEIGHT_DECAY)
    for _ in range(frt_epochs):
        train_epoch(model, train_loader, opt, device, False)
    results = {"full-rank": evaluate(model, test_loader, device, False)}
    calibration = [x for x, _ in itertools.islice(batches(train_loader, device), 8)]
    for name, bits in RUNS.items():
        fmodel = facto_fx.compile(copy.deepcopy(model), calibration_data=calibration, activation_bits=bits)
        opt = facto_optimizer(fmodel, LR / 10)
        facto_fx.attach(fmodel, opt, merge_every=len(train_loader), w_decay=LR / 10 * WEIGHT_DECAY)
        train_loader.generator.manual_seed(seed + 1)  # both runs see the same batches
        torch.manual_seed(seed + 1)
        for _ in range(facto_epochs):
            train_epoch(fmodel, train_loader, opt, device, False)
        results[name] = evaluate(fmodel, test_loader, device, False)
    return results


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--frt-epochs", type=int, default=3)
    parser.add_argument("--facto-epochs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1, help="seeds run side by side in processes")
    args = parser.parse_args(argv)
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = {s: pool.submit(run, args.dataset, s, args.frt_epochs, args.facto_epochs) for s in args.seeds}
        results = {s: f.result() for s, f in futures.items()}
    for seed, accuracies in results.items():
        print(f"seed {seed}: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in accuracies.items()))
    gaps = [r["codes 2 bits"] - r["no codes"] for r in results.values()]
    means = {k: statistics.mean(r[k] for r in results.values()) for k in RUNS}
    print(f"{args.dataset}: codes {100 * means['codes 2 bits']:.2f} %, none {100 * means['no codes']:.2f} %, "
          f"paired gap {100 * statistics.mean(gaps):+.2f} points over {len(gaps)} seeds")
    return results


if __name__ == "__main__":
    main()
