"""Peak memory of one whole training step (forward, backward, SGD step), vanilla vs Facto.

    python benchmarks/peak_memory.py                       # torchvision resnet18, batch 32, 224², CPU
    python benchmarks/peak_memory.py --model vgg11 --batch-size 8 --image-size 128

Saved bytes (what autograd keeps between forward and backward) are not what decides whether a
batch fits: the step's peak is. Both runs measure their second step (the first creates the
optimizer's momentum buffers), gradients set to None before it, with
`facto_fx.memory.peak_step_bytes`: the most memory held at once beyond what was live before the
step, from the allocator's events on the CPU, or torch.cuda.max_memory_allocated on a GPU.
Facto: INR 0.3, lossy kernel 2, apply ratio 1.0, batch-norm as `--batch-norm` says.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torchvision
from torch import nn

import facto_fx
from facto_fx.config import BATCH_NORM_MODES
from facto_fx.memory import peak_step_bytes

MiB = 2**20


def _measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1e-3, momentum=0.9)

    def step() -> None:
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()  # creates the momentum buffers
    optimizer.zero_grad(set_to_none=True)  # outside the measured step: it frees what was allocated before
    return peak_step_bytes(step, x.device)


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-norm", default="freeze", choices=BATCH_NORM_MODES, help="compile's batch_norm")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, num_classes=10).to(args.device)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=args.device)
    y = torch.randint(0, 10, (args.batch_size,), device=args.device)
    vanilla = _measure(model, x, y)
    fmodel = facto_fx.compile(model, inr=0.3, lossy_kernel=2, apply_ratio=1.0, batch_norm=args.batch_norm)
    facto = _measure(fmodel, x, y)
    print(
        f"{args.model}, batch {args.batch_size}, {args.image_size}², {args.device}, batch_norm={args.batch_norm}: "
        "peak of a training step "
        f"vanilla {vanilla / MiB:.1f} MiB, facto {facto / MiB:.1f} MiB, facto / vanilla = {facto / vanilla:.3f}"
    )
    return {"vanilla": vanilla, "facto": facto}


if __name__ == "__main__":
    main()
