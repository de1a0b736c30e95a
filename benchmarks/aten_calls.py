"""Aten calls per training step (forward, backward, SGD step), vanilla vs Facto.

    python benchmarks/aten_calls.py                      # torchvision resnet18, batch 2, 64²
    python benchmarks/aten_calls.py --model vgg11 --top 20
    python benchmarks/aten_calls.py --device cuda          # the Triton kernels' path (the default on a GPU)

On a CPU, and on a GPU at small batches, a step's time is mostly per-call overhead, so the number of
aten calls is a cost the Facto ops must keep low (the target is 1.5× vanilla). The calls are counted
with a TorchDispatchMode; inside a facto custom op the count goes on through its implementation,
so every aten call the op makes is counted, not the op itself (a Triton kernel's launch is not an aten
call; the allocations around it are). The second step is counted (the first creates the optimizer's
state).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence

import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import facto_fx

_BACKEND = {"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA}


class AtenCalls(TorchDispatchMode):
    """Counts aten calls by name, looking inside facto custom ops."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "facto":
            device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
            with self:  # run the op's own implementation with the count on
                return func.redispatch(torch._C.DispatchKeySet(_BACKEND[device]), *args, **kwargs)
        self.counts[str(func)] += 1
        return func(*args, **kwargs)


def count_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Counter[str]:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()
    with AtenCalls() as calls:
        step()
    return calls.counts


def main(argv: Sequence[str] | None = None) -> dict[str, Counter[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--top", type=int, default=10, help="most frequent calls of the Facto step to list")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=sorted(_BACKEND))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, num_classes=10).to(args.device)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=args.device)
    y = torch.randint(0, 10, (args.batch_size,), device=args.device)
    vanilla = count_step(model, x, y)
    facto = count_step(facto_fx.compile(model, inr=0.3, lossy_kernel=2, apply_ratio=1.0), x, y)
    total_v, total_f = sum(vanilla.values()), sum(facto.values())
    print(f"{args.model} on {args.device}: aten calls per training step, vanilla {total_v}, facto {total_f}, "
          f"facto / vanilla = {total_f / total_v:.2f}")
    for name, n in facto.most_common(args.top):
        print(f"  {n:5d}  {name}  (vanilla {vanilla.get(name, 0)})")
    return {"vanilla": vanilla, "facto": facto}


if __name__ == "__main__":
    main()
