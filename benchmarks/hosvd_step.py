"""CPU step time of fine-tuning the last conv layers: HOSVD / SVD vs vanilla, side by side in one run.

    python benchmarks/hosvd_step.py                       # resnet18, batch 32, 224², last 4, HOSVD eps 0.8
    python benchmarks/hosvd_step.py --mode svd --eps 0.9 --last 2

Both models train only the last `--last` conv layers (every other parameter frozen, batch-norm
statistics frozen, as in the paper's fine-tuning). The HOSVD model saves a truncated decomposition
of those layers' inputs instead of the inputs. Steps alternate between the two so machine noise hits
both alike; the figure that counts is the ratio of medians (the paper: 4.29x slower on average).
"""

from __future__ import annotations

import argparse
import copy

import torch
from cpu_step import make_step, median_step_times  # benchmarks/ is on sys.path when run as a script
from torch import nn

import facto_fx
from facto_fx.model_zoo import build_model, model_names


def last_convs(model: nn.Module, n: int) -> list[str]:
    """The last n conv layers in registration order (the paper's count; for resnet18 and
    mobilenet_v2 the same as execution order)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)][-n:]


def fine_tune_only(model: nn.Module, layers: list[str]) -> nn.Module:
    """Freeze every parameter but the weights and biases of `layers`; batch-norm in eval mode."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.rpartition(".")[0] in layers)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", choices=model_names(), metavar="MODEL")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--last", type=int, default=4, help="fine-tune the last N conv layers")
    parser.add_argument("--eps", type=float, default=0.8)
    parser.add_argument("--mode", choices=("hosvd", "svd"), default="hosvd")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    vanilla = build_model(args.model, num_classes=10)
    layers = last_convs(vanilla, args.last)
    source = fine_tune_only(copy.deepcopy(vanilla), layers)
    fine_tune_only(vanilla, layers)
    method = facto_fx.HOSVD(args.eps) if args.mode == "hosvd" else facto_fx.SVD(args.eps)
    # Only the chosen layers change: no Facto elsewhere, no packed masks (vanilla has none either).
    compressed = facto_fx.compile(source, apply_ratio=0.0, binarize_activations=False,
                                  methods=dict.fromkeys(layers, method))
    compressed.eval()  # frozen batch-norm in both; the compressed layers still save their codes
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (args.batch_size,))
    steps = {"vanilla": make_step(vanilla, x, y), args.mode: make_step(compressed, x, y)}
    medians = median_step_times(steps, args.warmup, args.steps)
    ratio = medians[args.mode] / medians["vanilla"]
    print(
        f"{args.model} batch {args.batch_size} {args.image_size}x{args.image_size}, last {args.last} convs, "
        f"{args.mode} eps {args.eps}, {torch.get_num_threads()} threads: vanilla {1e3 * medians['vanilla']:.0f} ms, "
        f"{args.mode} {1e3 * medians[args.mode]:.0f} ms, {args.mode} / vanilla = {ratio:.3f}"
    )
    return {"medians": medians, "ratio": ratio, "layers": layers}


if __name__ == "__main__":
    main()
