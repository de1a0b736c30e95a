"""Saved-for-backward bytes, Facto vs eager vanilla, for the configurations the paper reports.

    python benchmarks/memory_targets.py            # batch 2, 224x224, as in issue #2
    python benchmarks/memory_targets.py --batch-size 256 --measured   # measured instead of analytic

Analytic mode runs on meta tensors (nothing allocated) and gives the same bytes as a measured run.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torchvision

import facto_fx
from facto_fx.models import MODELS


@dataclass(frozen=True)
class Target:
    model: str
    apply_ratio: float
    storage_dtype: str | None
    limit: float  # facto / vanilla must not exceed this
    paper: str


TARGETS = (
    Target("vgg16", 1.0, None, 0.080, "7.97 %"),
    Target("vgg16", 1.0, "bf16", 0.055, "-"),
    Target("vgg16", 0.6, None, 0.143, "14.34 %"),
    Target("fixup_resnet18", 1.0, None, 0.15, "14.9 %"),
    Target("resnet18", 1.0, None, 0.20, "- (batch-norm frozen)"),
)


def build(name: str) -> torch.nn.Module:
    if name in MODELS:
        return MODELS[name]()
    return getattr(torchvision.models, name)(weights=None)


def measure(target: Target, batch_size: int, image_size: int, analytic: bool) -> facto_fx.MemoryReport:
    torch.manual_seed(0)
    device = torch.device("meta" if analytic else "cpu")
    with device:  # on meta, the model's 100M+ weights are never allocated or initialised
        model = build(target.model)
    fmodel = facto_fx.compile(  # a meta model cannot run, so it is verified only when measured for real
        model, inr=0.3, lossy_kernel=2, apply_ratio=target.apply_ratio, storage_dtype=target.storage_dtype,
        verify=not analytic,
    )
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    return facto_fx.report(fmodel, x, analytic=analytic)


def main(argv=None) -> list[tuple[Target, facto_fx.MemoryReport]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--measured", action="store_true", help="allocate real tensors instead of meta ones")
    args = parser.parse_args(argv)
    results = []
    print(f"INR 0.3, lossy kernel 2, batch {args.batch_size}, {args.image_size}x{args.image_size}, "
          f"{'measured' if args.measured else 'analytic'}")
    print(f"{'model':<16}{'ratio':>6} {'maps':>5} {'vanilla MiB':>12} {'facto MiB':>10} {'facto %':>8} "
          f"{'target':>7} {'paper':>8}")
    for target in TARGETS:
        report = measure(target, args.batch_size, args.image_size, analytic=not args.measured)
        ok = "ok" if report.ratio <= target.limit else "MISSED"
        print(
            f"{target.model:<16}{target.apply_ratio:>6} {target.storage_dtype or 'fp32':>5} "
            f"{report.vanilla_bytes / 2**20:>12.1f} {report.facto_bytes / 2**20:>10.2f} {100 * report.ratio:>8.2f} "
            f"{'<=' + format(100 * target.limit, '.1f'):>7} {target.paper:>8}  {ok}"
        )
        results.append((target, report))
    return results


if __name__ == "__main__":
    main()
