"""The CNNs people train today: a training step's peak and time, Facto beside checkpointing.

    python benchmarks/modern_cnns.py                        # the five models below, batch 8, 160², CPU
    python benchmarks/modern_cnns.py --models torchvision:efficientnet_b0 --batch-size 4

The issue "Modern CNNs in a quarter of the memory" targets, per model: the peak of a training step
at most 30 % of vanilla's and its time at most 1.25× vanilla eager, better than checkpointing on
both. Each model is measured in one run, the methods taking turns step by step (the machine is
shared and noisy): the peak of one forward + backward (`facto_fx.memory.peak_step_bytes`: the CPU
allocator's events), the median time of a forward + backward + SGD step, both as ratios to eager
vanilla. The methods:

- **checkpoint**: what a user of each library turns on: torchvision's `features` run through
  `torch.utils.checkpoint.checkpoint_sequential` in `--segments` segments (non-reentrant); timm's
  own `set_grad_checkpointing()` (every stage checkpointed).
- **facto**: `facto_fx.compile(model)`, its defaults (apply ratio 0.6, few-bit activation codes,
  the 4-bit fixed-rate store for depthwise / grouped convs, squeeze-excite products and norms).
- **facto 1.0**: apply ratio 1.0; **facto 1.0, no store**: the same with `store_bits=None` (what the
  store is worth); **facto 1.0, no new forms**: with `activation_bits=None` too, Facto's own forms
  alone (what the codes are worth).

Batch-norm trains on batch statistics in every run (compile's default: lossy).
"""

from __future__ import annotations

import argparse
import copy
import warnings
from collections.abc import Callable, Sequence

import torch
from cpu_step import make_step, median_step_times
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

import facto_fx
from facto_fx.memory import peak_step_bytes
from facto_fx.model_zoo import build_model

MODELS = ("torchvision:mobilenet_v3_large", "torchvision:efficientnet_b0", "torchvision:convnext_tiny",
          "timm:regnety_016", "timm:mobilenetv4_conv_small")
FACTO = {
    "facto": {},
    "facto 1.0": {"apply_ratio": 1.0},
    "facto 1.0, no store": {"apply_ratio": 1.0, "store_bits": None},
    "facto 1.0, no new forms": {"apply_ratio": 1.0, "store_bits": None, "activation_bits": None},
}
TARGET_PEAK, TARGET_TIME = 0.30, 1.25


def build(spec: str, num_classes: int = 1000) -> nn.Module:
    """An untrained model from a "library:name" spec (torchvision or timm)."""
    library, _, name = spec.partition(":")
    if library == "timm":
        import timm

        return timm.create_model(name, num_classes=num_classes)
    return build_model(name, num_classes=num_classes)


class Checkpointed(nn.Module):
    """A torchvision model whose `features` run in checkpointed segments (the rest as it is)."""

    def __init__(self, model: nn.Module, segments: int) -> None:
        super().__init__()
        self.model, self.segments = model, segments
        features = model.features
        model.features = nn.Identity()  # forward runs the segments below, then the model's own rest
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = checkpoint_sequential(self.features, self.segments, x, use_reentrant=False)
        return self.model(x)


def checkpointed(spec: str, model: nn.Module, segments: int) -> nn.Module:
    if spec.startswith("timm:"):
        model.set_grad_checkpointing(True)
        return model
    return Checkpointed(model, segments)


def _backward_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()

    return step


def measure(spec: str, batch_size: int, image_size: int, segments: int, repeats: int) -> dict[str, dict[str, float]]:
    """Per method: peak and step time as fractions of vanilla's, and saved bytes (Facto's report)."""
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size)
    y = torch.randint(0, 1000, (batch_size,))
    torch.manual_seed(0)
    model = build(spec).train()
    models = {"vanilla": model, "checkpoint": checkpointed(spec, copy.deepcopy(model), segments).train()}
    saved = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # compile's notes on what it leaves; the report below has them
        for name, options in FACTO.items():
            fmodel = facto_fx.compile(copy.deepcopy(model), example_inputs=x[:2], **options).train()
            saved[name] = facto_fx.report(fmodel, x, analytic=True).ratio
            models[name] = fmodel
    peaks = {name: peak_step_bytes(_backward_step(m, x, y)) for name, m in models.items()}
    times = median_step_times({name: make_step(m, x, y) for name, m in models.items()}, warmup=1, repeats=repeats)
    return {name: {"peak": peaks[name] / peaks["vanilla"], "time": times[name] / times["vanilla"],
                   "saved": saved.get(name, 1.0 if name == "vanilla" else float("nan"))} for name in models}


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="library:name, torchvision or timm")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--segments", type=int, default=4, help="checkpoint_sequential segments (torchvision)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per method")
    args = parser.parse_args(argv)
    print(f"batch {args.batch_size}, {args.image_size}², {torch.get_num_threads()} CPU threads; "
          f"target: peak <= {TARGET_PEAK:.0%} and step <= {TARGET_TIME}x vanilla\n")
    print("| model | method | peak / vanilla | step time / vanilla | saved bytes / vanilla |")
    print("|---|---|---|---|---|")
    results = {}
    for spec in args.models:
        results[spec] = measure(spec, args.batch_size, args.image_size, args.segments, args.repeats)
        for name, r in results[spec].items():
            saved = "" if name == "checkpoint" else f"{100 * r['saved']:.1f} %"
            print(f"| {spec} | {name} | {100 * r['peak']:.1f} % | {r['time']:.2f}× | {saved} |", flush=True)
    return results


if __name__ == "__main__":
    main()
