"""Facto beside the other ways to train in less memory: saved bytes and CPU step time, one run.

    python benchmarks/peer.py                      # torchvision vgg11 and resnet18, batch 4, 128x128

Saved bytes are what autograd keeps for backward (docs/design.md §5): saved_tensors_hooks for eager
code (checkpoint_sequential in its reentrant form saves each segment's input through them), and
the backward graph's inputs under inductor's partitioner for torch.compile
(facto_fx.compiled_memory). Step times are medians of full training steps (forward, backward,
SGD), the methods taking turns so machine noise hits them alike; ratios are to eager vanilla.
Facto freezes batch-norm statistics (resnet18); the other methods train them.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

import facto_fx
from facto_fx.compiled_memory import compiled_saved_bytes
from facto_fx.memory import saved_bytes

METHODS = (
    "eager vanilla", "torch.compile", "compile, budget 0.5", "checkpoint_sequential", "facto", "facto + compile",
)


def as_sequential(model: nn.Module) -> nn.Sequential:
    """A torchvision classifier's children in order (Sequentials opened), flattened before the first Linear."""
    layers: list[nn.Module] = []
    for child in model.children():
        layers.extend(child if isinstance(child, nn.Sequential) else [child])
    first_linear = next(i for i, m in enumerate(layers) if isinstance(m, nn.Linear))
    layers.insert(first_linear, nn.Flatten(1))
    return nn.Sequential(*layers)


@dataclass
class Method:
    """One way to train: the callable a step runs, and its trainable parameters."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    parameters: list[nn.Parameter]


def _compiled(module: nn.Module, x: torch.Tensor, budget: float | None) -> Callable:
    """torch.compile'd module, compiled now (the budget is read when the partitioner runs)."""
    compiled = torch.compile(module)
    patch = {} if budget is None else {"activation_memory_budget": budget}
    with torch._functorch.config.patch(patch):
        compiled(x).sum().backward()
    module.zero_grad(set_to_none=True)
    return compiled


def measure(name: str, batch_size: int, image_size: int, segments: int, apply_ratio: float):
    """(saved MiB per method, the methods ready to time)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    x = torch.randn(batch_size, 3, image_size, image_size)
    sequential = as_sequential(copy.deepcopy(model))
    for module in sequential.modules():  # a segment may start at a ReLU, whose input is then a leaf
        if getattr(module, "inplace", False):
            module.inplace = False
    torch.testing.assert_close(sequential.eval()(x), copy.deepcopy(model).eval()(x))
    sequential.train()
    fmodel = facto_fx.compile(copy.deepcopy(model), inr=0.3, lossy_kernel=2, apply_ratio=apply_ratio)
    x_grad = x.clone().requires_grad_(True)  # the reentrant checkpoint passes gradients only to inputs that need them

    def checkpointed(inputs):
        return checkpoint_sequential(sequential, segments, inputs, use_reentrant=True)

    report = facto_fx.report(fmodel, x, analytic=True)
    mib = {
        "eager vanilla": report.vanilla_bytes,
        "torch.compile": compiled_saved_bytes(model, x),
        "compile, budget 0.5": compiled_saved_bytes(model, x, activation_memory_budget=0.5),
        "checkpoint_sequential": saved_bytes(checkpointed, x_grad, exclude=list(sequential.parameters())),
        "facto": report.facto_bytes,
        "facto + compile": compiled_saved_bytes(fmodel, x),
    }
    mib = {k: v / 2**20 for k, v in mib.items()}
    trainable = [p for p in fmodel.parameters() if p.requires_grad]
    budget_model = copy.deepcopy(model)
    methods = {
        "eager vanilla": Method(model, list(model.parameters())),
        "torch.compile": Method(_compiled(model, x, None), list(model.parameters())),
        "compile, budget 0.5": Method(_compiled(budget_model, x, 0.5), list(budget_model.parameters())),
        "checkpoint_sequential": Method(lambda inputs: checkpointed(inputs.requires_grad_(True)),
                                        list(sequential.parameters())),
        "facto": Method(fmodel, trainable),
        "facto + compile": Method(_compiled(fmodel, x, None), trainable),
    }
    return mib, methods


def time_steps(methods: dict[str, Method], x: torch.Tensor, steps: int, warmup: int) -> dict[str, float]:
    """Median seconds of a training step per method, the methods taking turns step by step."""
    target = torch.randint(0, 1000, (x.shape[0],))
    optimizers = {k: torch.optim.SGD(m.parameters, lr=1e-4, momentum=0.9) for k, m in methods.items()}
    times: dict[str, list[float]] = {k: [] for k in methods}
    for i in range(warmup + steps):
        for key, method in methods.items():
            start = time.perf_counter()
            optimizers[key].zero_grad(set_to_none=True)
            nn.functional.cross_entropy(method.forward(x.clone()), target).backward()
            optimizers[key].step()
            if i >= warmup:
                times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> dict[str, dict[str, tuple[float, float]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vgg11", "resnet18"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--segments", type=int, default=4, help="checkpoint_sequential segments")
    parser.add_argument("--apply-ratio", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"batch {args.batch_size}, {args.image_size}x{args.image_size}, {torch.get_num_threads()} CPU threads; "
          f"facto: INR 0.3, lossy kernel 2, apply ratio {args.apply_ratio}; checkpoint: {args.segments} segments\n")
    print("| model | method | saved MiB | % of eager | step ms | time / eager |")
    print("|---|---|---|---|---|---|")
    results = {}
    for name in args.models:
        mib, methods = measure(name, args.batch_size, args.image_size, args.segments, args.apply_ratio)
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
        seconds = time_steps(methods, x, args.steps, args.warmup)
        results[name] = {k: (mib[k], seconds[k]) for k in METHODS}
        for k in METHODS:
            print(f"| {name} | {k} | {mib[k]:.2f} | {100 * mib[k] / mib['eager vanilla']:.1f} | "
                  f"{1e3 * seconds[k]:.0f} | {seconds[k] / seconds['eager vanilla']:.2f} |")
    return results


if __name__ == "__main__":
    main()
