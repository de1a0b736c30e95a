"""Saved-for-backward bytes: eager and compiled, vanilla and Facto, side by side.

    python benchmarks/compiled_memory.py    # torchvision vgg11, resnet18 and efficientnet_b0, batch 2, 224x224

Eager figures count saved_tensors_hooks (docs/design.md §5); compiled ones count the extra outputs of
AOTAutograd's forward graph under inductor's partitioner (facto_fx.compiled_memory).
"""

from __future__ import annotations

import argparse

import torch
import torchvision

import facto_fx
from facto_fx.compiled_memory import compiled_saved_bytes

COLUMNS = (
    "eager vanilla", "vanilla torch.compile", "compile, budget 0.5", "eager facto", "facto + torch.compile",
)


def measure(name: str, batch_size: int, image_size: int, apply_ratio: float) -> list[float]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    x = torch.randn(batch_size, 3, image_size, image_size)
    compiled = compiled_saved_bytes(model, x)
    budget = compiled_saved_bytes(model, x, activation_memory_budget=0.5)
    fmodel = facto_fx.compile(model, inr=0.3, lossy_kernel=2, apply_ratio=apply_ratio)
    eager = facto_fx.report(fmodel, x, analytic=True)
    facto_compiled = compiled_saved_bytes(fmodel, x)
    return [b / 2**20 for b in (eager.vanilla_bytes, compiled, budget, eager.facto_bytes, facto_compiled)]


def main(argv=None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vgg11", "resnet18", "efficientnet_b0"])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--apply-ratio", type=float, default=1.0)
    args = parser.parse_args(argv)
    print(f"saved for backward, MiB (batch {args.batch_size}, {args.image_size}x{args.image_size}, "
          f"INR 0.3, lossy kernel 2, apply ratio {args.apply_ratio})\n")
    print("| model | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    results = {}
    for name in args.models:
        results[name] = measure(name, args.batch_size, args.image_size, args.apply_ratio)
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in results[name]) + " |")
    return results


if __name__ == "__main__":
    main()
