"""The Facto + ErrorBounded preset on torchvision models: saved bytes against eager vanilla, and
the CPU training-step time against Facto alone.

    python benchmarks/eb_models.py                 # saved bytes, batch 2, 224², the issue's four models
    python benchmarks/eb_models.py --step mobilenet_v2 --batch-size 8 --image-size 112

Both compile with `store_bits=None`: the fixed-rate store (a default since) covers most of what
ErrorBounded covers here, at a fraction of its cost. Saved bytes are facto_fx.report's (eager
vanilla: every weight trained, nothing compressed). Each fresh model's batch-norm statistics are
first set from its own activations (Facto freezes them).
The adaptive bounds of the preset's conv / linear layers are measured on a training call first (one
forward and backward on random labels), as in training; until then such a layer keeps its input.
Step times alternate between the two models, so machine noise hits both alike (ratio of medians).
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
import torchvision
from cpu_step import make_step, median_step_times

import facto_fx
from facto_fx import presets

MODELS = ("mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny")
TARGETS = {"mobilenet_v2": 0.20, "mobilenet_v3_small": 0.20, "efficientnet_b0": 0.20, "convnext_tiny": 0.35}


@torch.no_grad()
def calibrated(name: str, num_classes: int, batch_size: int, image_size: int) -> torch.nn.Module:
    """A fresh model whose batch-norm statistics describe its own activations (a few train-mode
    forward passes, cumulative averages), as a trained model's do: Facto freezes them, and frozen
    statistics of a fresh model (mean 0, variance 1) would shrink the deep maps towards zero."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=num_classes).train()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    for _ in range(4):
        model(torch.randn(batch_size, 3, image_size, image_size))
    for norm in norms:
        norm.momentum = 0.1
    return model


def compiled_pair(name: str, batch_size: int, image_size: int, num_classes: int = 1000):
    """Facto alone and the preset, both without the fixed-rate store: what ErrorBounded adds where
    Facto's own forms and the activation codes leave a layer as it is."""
    model = calibrated(name, num_classes, batch_size, image_size)
    return (facto_fx.compile(copy.deepcopy(model), store_bits=None),
            facto_fx.compile(copy.deepcopy(model), presets.facto_error_bounded(store_bits=None)))


def saved_shares(name: str, batch_size: int, image_size: int) -> dict[str, float]:
    """Facto alone's and the preset's saved bytes, as shares of eager vanilla's."""
    alone, both = compiled_pair(name, batch_size, image_size)
    x = torch.randn(batch_size, 3, image_size, image_size)
    F.cross_entropy(both(x), torch.randint(0, 1000, (batch_size,))).backward()  # the adaptive bounds' measurement
    both.zero_grad(set_to_none=True)
    return {"facto": facto_fx.report(alone, x).ratio, "preset": facto_fx.report(both, x).ratio}


def step_ratio(name: str, batch_size: int, image_size: int, steps: int, warmup: int) -> float:
    """Median preset step time over Facto alone's, side by side."""
    alone, both = compiled_pair(name, batch_size, image_size, num_classes=10)
    x = torch.randn(batch_size, 3, image_size, image_size)
    y = torch.randint(0, 10, (batch_size,))
    medians = median_step_times({"facto": make_step(alone, x, y), "preset": make_step(both, x, y)}, warmup, steps)
    print(f"{name} batch {batch_size} {image_size}x{image_size}, {torch.get_num_threads()} threads: Facto alone "
          f"{1e3 * medians['facto']:.0f} ms, preset {1e3 * medians['preset']:.0f} ms, "
          f"preset / Facto = {medians['preset'] / medians['facto']:.3f}")
    return medians["preset"] / medians["facto"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--step", metavar="MODEL", help="time training steps of MODEL instead")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    if args.step:
        return {"step_ratio": step_ratio(args.step, args.batch_size, args.image_size, args.steps, args.warmup)}
    results = {}
    for name in args.models:
        results[name] = saved_shares(name, args.batch_size, args.image_size)
        target = TARGETS.get(name)
        print(f"{name:<20} saved bytes, % of eager vanilla: Facto alone {100 * results[name]['facto']:5.1f}, "
              f"Facto + ErrorBounded {100 * results[name]['preset']:5.1f}"
              + (f"   (target <= {100 * target:.0f})" if target else ""))
    return results


if __name__ == "__main__":
    main()
