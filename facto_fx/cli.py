"""The facto-fx command.

    facto-fx report --model vgg16 --batch-size 256 --image-size 224 --inr 0.3 --lossy-kernel 2 --apply-ratio 0.6
"""

from __future__ import annotations

import argparse
import sys

import torch

import facto_fx
from facto_fx.model_zoo import build_model


def _add_facto_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inr", type=float, default=0.3, help="internal node ratio, C_R = round(inr * C_I)")
    parser.add_argument("--lossy-kernel", type=int, default=2, help="mean-pool size of saved maps (1: none)")
    parser.add_argument("--apply-ratio", type=float, default=0.6, help="share of layers compressed from the input")
    parser.add_argument("--storage-dtype", default=None, help="dtype of compressed maps: fp32, bf16, fp16")


def report_command(args: argparse.Namespace) -> int:
    """Per-layer saved bytes, vanilla vs Facto, computed on meta tensors (nothing is allocated)."""
    model = build_model(args.model, num_classes=args.num_classes, device="meta")
    fmodel = facto_fx.compile(
        model, inr=args.inr, lossy_kernel=args.lossy_kernel, apply_ratio=args.apply_ratio,
        storage_dtype=args.storage_dtype,
    )
    x = torch.empty(args.batch_size, args.in_channels, args.image_size, args.image_size, device="meta")
    table = facto_fx.report(fmodel, x, analytic=True)
    print(f"{args.model}, batch {args.batch_size}, {args.image_size}x{args.image_size}, INR {args.inr}, "
          f"lossy kernel {args.lossy_kernel}, apply ratio {args.apply_ratio}\n")
    print(table)
    if args.plot:
        from facto_fx.plots import plot_memory_breakdown

        print(f"\nplot: {plot_memory_breakdown(table, args.plot, title=args.model)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facto-fx", description="Facto-CNN: train CNNs in less memory.")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="feature-map bytes per layer, vanilla vs Facto (paper Table 3)")
    report.add_argument("--model", default="vgg16", help="a torchvision classification model or a package model")
    report.add_argument("--batch-size", type=int, default=256)
    report.add_argument("--image-size", type=int, default=224)
    report.add_argument("--in-channels", type=int, default=3)
    report.add_argument("--num-classes", type=int, default=1000)
    report.add_argument("--plot", default=None, help="write a per-op breakdown picture to this path (.png/.svg)")
    _add_facto_options(report)
    report.set_defaults(run=report_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, RuntimeError) as error:
        print(f"facto-fx {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
