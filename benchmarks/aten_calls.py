"""Aten calls per training step (forward, backward, SGD step), vanilla vs Facto.

    python benchmarks/aten_calls.py                      # torchvision resnet18, batch 2, 64², PyTorch path
    python benchmarks/aten_calls.py --model vgg11 --top 20
    TRITON_INTERPRET=1 python benchmarks/aten_calls.py --kernels triton   # the GPU path, on the CPU
    python benchmarks/aten_calls.py --device cuda          # the Triton kernels' path (the default on a GPU)

On a CPU, and on a GPU at small batches, a step's time is mostly per-call overhead, so the number of
aten calls is a cost the Facto ops must keep low (the target is 1.5× vanilla). The calls are counted
with a TorchDispatchMode; inside a facto custom op the count goes on through its implementation,
so every aten call the op makes is counted, not the op itself. A Triton kernel's launch counts as
one call ("triton launch"; the allocations around it count too). The second step is counted (the
first creates the optimizer's state).

`--kernels triton` on the CPU runs the kernels in Triton's interpreter (slow: minutes), counting
each launch once and none of the interpreter's own work, and gives SGD torch's CUDA default
(foreach), so both counts are those of the GPU path, up to the PyTorch code that differs by device
(on the CPU, 2×2 pools of evenly tiled maps are strided adds, 7 calls instead of 1).
"""

from __future__ import annotations

import argparse
import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence

import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import facto_fx
from facto_fx.triton_ops.dispatch import KERNEL_CHOICES, interpreter_enabled

_BACKEND = {"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA}
LAUNCH = "triton launch"


class AtenCalls(TorchDispatchMode):
    """Counts aten calls by name, looking inside facto custom ops; `launch()` counts a kernel
    launch as one call and nothing that runs inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self._launching = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "facto":
            device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
            with self:  # run the op's own implementation with the count on
                return func.redispatch(torch._C.DispatchKeySet(_BACKEND[device]), *args, **kwargs)
        if not self._launching:
            self.counts[str(func)] += 1
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def launch(self) -> Iterator[None]:
        if not self._launching:
            self.counts[LAUNCH] += 1
        self._launching += 1
        try:
            yield
        finally:
            self._launching -= 1


@contextlib.contextmanager
def counting_interpreted_launches(calls: AtenCalls) -> Iterator[None]:
    """Route every launch of an interpreted Triton kernel through `calls.launch()`."""
    from triton.runtime.interpreter import GridExecutor

    run = GridExecutor.__call__

    def counted(self, *args, **kwargs):
        with calls.launch():
            return run(self, *args, **kwargs)

    GridExecutor.__call__ = counted
    try:
        yield
    finally:
        GridExecutor.__call__ = run


def count_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, foreach: bool | None = None) -> Counter[str]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=foreach)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()
    calls = AtenCalls()
    interpreted = x.device.type == "cpu" and interpreter_enabled()
    with counting_interpreted_launches(calls) if interpreted else contextlib.nullcontext(), calls:
        step()
    return calls.counts


def main(argv: Sequence[str] | None = None) -> dict[str, Counter[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--top", type=int, default=10, help="most frequent calls of the Facto step to list")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=sorted(_BACKEND))
    parser.add_argument("--kernels", default="auto", choices=KERNEL_CHOICES,
                        help="the Facto ops' implementation (auto: Triton on CUDA, PyTorch on the CPU)")
    args = parser.parse_args(argv)
    if args.kernels == "triton" and args.device == "cpu" and not interpreter_enabled():
        parser.error("--kernels triton on the CPU runs Triton's interpreter: set TRITON_INTERPRET=1 before the command")
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, num_classes=10).to(args.device)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=args.device)
    y = torch.randint(0, 10, (args.batch_size,), device=args.device)
    foreach = True if args.kernels == "triton" else None  # torch's default on CUDA
    vanilla = count_step(model, x, y, foreach)
    fmodel = facto_fx.compile(model, inr=0.3, lossy_kernel=2, apply_ratio=1.0, kernels=args.kernels)
    facto = count_step(fmodel, x, y, foreach)
    total_v, total_f = sum(vanilla.values()), sum(facto.values())
    print(f"{args.model} on {args.device}, kernels={args.kernels}: aten calls per training step, vanilla {total_v}, "
          f"facto {total_f}, facto / vanilla = {total_f / total_v:.2f}")
    for name, n in facto.most_common(args.top):
        print(f"  {n:5d}  {name}  (vanilla {vanilla.get(name, 0)})")
    return {"vanilla": vanilla, "facto": facto}


if __name__ == "__main__":
    main()
