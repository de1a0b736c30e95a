"""Row strips (LR-CNN): peak memory and step time of a training step, vanilla vs each method.

    python benchmarks/row_strips.py                                  # vgg16, batch 8, 224², 8 strips, CPU
    python benchmarks/row_strips.py --model resnet50                 # batch-norm frozen
    python benchmarks/row_strips.py --model vgg11 --batch-size 2 --image-size 64 --steps 2

Row strips change a step's peak, not what each layer saves, so the peak is the figure: the most
memory held at once during a whole step (forward, backward, SGD step) beyond what was live before
it (`facto_fx.memory.peak_step_bytes`; gradients are set to None before the step, so they count),
measured on each model's second step. Step times are medians of steps taken in turn, so noise hits
every model alike; ratios to vanilla are what to compare. Batch-norm is frozen in every model
(vanilla's too), which is what strips need to be lossless. Models: vanilla; strips (overlap and
two_phase); Facto (INR 0.3, lossy kernel 2, apply ratio 1.0); both. The step's
own gradients are in every peak alike, and no activation method removes them: the first line
says how many bytes they are (vgg16's classifier alone has 0.48 GiB).
"""

from __future__ import annotations

import argparse
import copy
import warnings
from collections.abc import Sequence

import torch
import torchvision
from cpu_step import median_step_times
from torch import nn

import facto_fx
from facto_fx.memory import peak_step_bytes
from facto_fx.methods import RowStrips

MiB = 2**20


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def _frozen_batch_norm(model: nn.Module) -> nn.Module:
    """Vanilla with batch-norm in eval mode (running statistics), as the compiled models have it."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def build(name: str, x: torch.Tensor, strips: int, apply_ratio: float) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=1000).to(x.device)
    ratio = apply_ratio
    options = {  # each compiled from its own copy: a Facto model freezes the weights it shares
        "strips overlap": {"apply_ratio": 0.0, "row_strips": RowStrips(strips, "overlap")},
        "strips two_phase": {"apply_ratio": 0.0, "row_strips": RowStrips(strips, "two_phase")},
        f"facto (apply_ratio {ratio})": {"apply_ratio": ratio},
        "facto + strips overlap": {"apply_ratio": ratio, "row_strips": RowStrips(strips, "overlap")},
        "facto + strips two_phase": {"apply_ratio": ratio, "row_strips": RowStrips(strips, "two_phase")},
    }
    with warnings.catch_warnings():  # random weights: their statistics mean nothing for memory and time
        warnings.filterwarnings("ignore", message="compile freezes batch-norm statistics")
        models = {name: facto_fx.compile(copy.deepcopy(model), example_inputs=(x[:1],), **o)
                  for name, o in options.items()}
    return {"vanilla": _frozen_batch_norm(model), **models}


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--strips", type=int, default=8)
    parser.add_argument("--apply-ratio", type=float, default=1.0, help="Facto's apply ratio (INR 0.3, lossy kernel 2)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=args.device)
    y = torch.randint(0, 1000, (args.batch_size,), device=args.device)
    models = build(args.model, x, args.strips, args.apply_ratio)
    steps = {name: _step(model, x, y) for name, model in models.items()}
    peaks = {}
    for name, step in steps.items():
        step()  # creates the momentum buffers
        for p in models[name].parameters():
            p.grad = None
        peaks[name] = peak_step_bytes(step, x.device)
    times = median_step_times(steps, warmup=0, repeats=args.steps)
    gradients = sum(p.numel() * p.element_size() for p in models["vanilla"].parameters())
    print(f"{args.model}, batch {args.batch_size}, {args.image_size}², {args.strips} strips, {args.device}; "
          f"the step's own gradients: {gradients / MiB:.0f} MiB")
    print(f"{'model':<30} {'peak MiB':>9} {'/ vanilla':>9} {'step s':>7} {'/ vanilla':>9}")
    results = {}
    for name in models:
        results[name] = {"peak": peaks[name], "peak_ratio": peaks[name] / peaks["vanilla"],
                         "time": times[name], "time_ratio": times[name] / times["vanilla"]}
        r = results[name]
        print(f"{name:<30} {r['peak'] / MiB:>9.1f} {r['peak_ratio']:>9.3f} {r['time']:>7.2f} {r['time_ratio']:>9.3f}")
    return results


if __name__ == "__main__":
    main()
