"""CPU training-step time, vanilla vs Facto, measured side by side in one run.

    python benchmarks/cpu_step.py --model cifar_vgg11 --batch-size 64 --image-size 32
    python benchmarks/cpu_step.py --model resnet18 --batch-size 8 --image-size 128

Steps alternate between the two models so machine noise hits both alike; the figure that counts
is the ratio of medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import facto_fx
from facto_fx.config import BATCH_NORM_MODES
from facto_fx.model_zoo import build_model, model_names


def make_step(model, batch, target):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(batch), target).backward()
        opt.step()

    return step


def median_step_times(steps: dict, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds of each step, the steps taking turns so machine noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar_vgg11", choices=model_names(), metavar="MODEL",
                        help="a torchvision classification model or one of the package's own")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--inr", type=float, default=0.3)
    parser.add_argument("--lossy-kernel", type=int, default=2)
    parser.add_argument("--apply-ratio", type=float, default=1.0)
    parser.add_argument("--batch-norm", default="freeze", choices=BATCH_NORM_MODES, help="compile's batch_norm")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    vanilla = build_model(args.model, num_classes=10)
    source = build_model(args.model, num_classes=10)
    source.load_state_dict(vanilla.state_dict())
    facto = facto_fx.compile(source, inr=args.inr, lossy_kernel=args.lossy_kernel, apply_ratio=args.apply_ratio,
                             batch_norm=args.batch_norm)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (args.batch_size,))
    steps = {"vanilla": make_step(vanilla, x, y), "facto": make_step(facto, x, y)}
    medians = median_step_times(steps, args.warmup, args.steps)
    ratio = medians["facto"] / medians["vanilla"]
    print(
        f"{args.model} batch {args.batch_size} {args.image_size}x{args.image_size}, batch_norm={args.batch_norm}, "
        f"{torch.get_num_threads()} threads: "
        f"vanilla {1e3 * medians['vanilla']:.1f} ms, facto {1e3 * medians['facto']:.1f} ms, "
        f"facto / vanilla = {ratio:.3f}"
    )
    return {"medians": medians, "ratio": ratio}


if __name__ == "__main__":
    main()
