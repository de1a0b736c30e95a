"""The facto-fx command.

    facto-fx demo                                   # vanilla vs Facto on the bundled digits, with plots
    facto-fx train --model resnet18 --dataset cifar10 --data-dir data --download --epochs 30 --frt-epochs 10
    torchrun --nproc-per-node 2 -m facto_fx train ...   # one process per GPU (or CPU, with gloo)
    facto-fx report --model vgg16 --batch-size 256 --image-size 224 --inr 0.3 --lossy-kernel 2 --apply-ratio 0.6
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

import facto_fx
from facto_fx.config import BATCH_NORM_MODES, FactoConfig
from facto_fx.methods.facto import DIRECTIONS, SCALES
from facto_fx.model_zoo import build_model, check_model_name
from facto_fx.presets import METHOD_CHOICES, auto_batch_norm, method_description, method_options
from facto_fx.training import TrainConfig
from facto_fx.training.config import OPTIMIZERS, SWITCHES
from facto_fx.training.data import DATASETS
from facto_fx.training.distributed import resolve_device


def _bits_or_none(text: str) -> int | None:
    return None if text == "none" else int(text)


def _add_facto_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inr", type=float, default=FactoConfig.inr,
                        help="internal node ratio, C_R = round(inr * C_I)")
    parser.add_argument("--lossy-kernel", type=int, default=FactoConfig.lossy_kernel,
                        help="mean-pool size of saved maps (1: none)")
    parser.add_argument("--apply-ratio", type=float, default=FactoConfig.apply_ratio,
                        help="share of layers compressed from the input")
    parser.add_argument("--storage-dtype", default=None,
                        help="dtype of compressed maps: fp32, bf16, fp16 (default: each map's own)")
    parser.add_argument("--batch-norm", default="auto", choices=("auto", *BATCH_NORM_MODES),
                        help="lossy: batch statistics, as the model trains them, x̂ saved pooled (keeps accuracy); "
                             "freeze: running statistics, frozen (the paper; faster on the CPU, lost 1.5-3 points "
                             "in benchmarks/accuracy.py); train: torch's batch-norm left as it is (its input saved "
                             "whole); auto: compile's default (lossy), freeze with --method rowstrips")
    parser.add_argument("--method", default="facto", choices=METHOD_CHOICES,
                        help="hosvd / svd: that decomposition on the last --last conv layers too (Facto in front); "
                             "eb: error-bounded compression of every layer Facto leaves; rowstrips: the local "
                             "layers from the input run in horizontal strips (lossless; lowers the peak)")
    parser.add_argument("--eps", type=float, default=0.8, help="hosvd / svd: energy kept per mode, in (0, 1]")
    parser.add_argument("--last", type=int, default=4, help="hosvd / svd: how many conv layers, from the output")
    parser.add_argument("--eb", type=float, default=0.02,
                        help="eb: error bound of ops without weights, relative to each map's value range")
    parser.add_argument("--sigma", type=float, default=0.1,
                        help="eb: conv / linear gradient error tolerated, x the gradient's std (adaptive bound)")
    parser.add_argument("--activation-bits", type=_bits_or_none, default=FactoConfig.activation_bits,
                        help="bits of the derivative code SiLU / GELU / Hardswish / Mish / ELU keep (1, 2, 4 or 8; "
                             "none: left as they are)")
    parser.add_argument("--store-bits", type=_bits_or_none, default=FactoConfig.store_bits,
                        help="bits of the fixed-rate store for what no other form covers: depthwise / grouped conv "
                             "inputs, squeeze-excite products, layer and group norms (2, 4 or 8; none: left as they "
                             "are)")
    parser.add_argument("--strips", type=int, default=8, help="rowstrips: how many horizontal strips")
    parser.add_argument("--strip-mode", default="two_phase", choices=("two_phase", "overlap"),
                        help="rowstrips: overlap recomputes shared rows; two_phase hands them on")


def report_command(args: argparse.Namespace) -> int:
    """Per-layer saved bytes, vanilla vs Facto, computed on meta tensors (nothing is allocated).

    Nothing runs on meta tensors, so the rewrite is not verified here; `compile` verifies it when
    a real model is trained. With --peak the model is real (on --device): the rewrite is verified,
    and one forward + backward of each model is run to measure its peak memory.
    """
    device = resolve_device(args.device) if args.peak else torch.device("meta")
    model = build_model(args.model, num_classes=args.num_classes, device=device)
    fmodel = facto_fx.compile(
        model, inr=args.inr, lossy_kernel=args.lossy_kernel, apply_ratio=args.apply_ratio,
        storage_dtype=args.storage_dtype, activation_bits=args.activation_bits, store_bits=args.store_bits,
        verify=args.peak,
        batch_norm=auto_batch_norm(args.method) if args.batch_norm == "auto" else args.batch_norm,
        **method_options(args.method, args.eps, args.last, args.eb, args.sigma, args.strips, args.strip_mode),
    )
    shape = (args.batch_size, args.in_channels, args.image_size, args.image_size)
    x = torch.randn(shape, device=device) if args.peak else torch.empty(shape, device=device)
    table = facto_fx.report(fmodel, x, analytic=not args.peak, peak=args.peak)
    extra = method_description(args.method, args.eps, args.last, args.eb, args.sigma, args.strips, args.strip_mode)
    print(f"{args.model}, batch {args.batch_size}, {args.image_size}x{args.image_size}, INR {args.inr}, "
          f"lossy kernel {args.lossy_kernel}, apply ratio {args.apply_ratio}{extra}\n")
    print(table)
    if args.plot:
        from facto_fx.plots import plot_memory_breakdown

        print(f"\nplot: {plot_memory_breakdown(table, args.plot, title=args.model)}")
    return 0


def _add_training_options(parser: argparse.ArgumentParser, epochs: int, frt_epochs: int, lr: float,
                          switch: str) -> None:
    defaults = TrainConfig()
    parser.add_argument("--model", default=defaults.model, help="a torchvision classification model or a package model")
    parser.add_argument("--dataset", default=defaults.dataset, help=f"one of {', '.join(DATASETS)}")
    parser.add_argument("--data-dir", default=None,
                        help="where cifar10 / imagefolder data are, or go with --download (required by those)")
    parser.add_argument("--download", action="store_true", help="download cifar10 into --data-dir")
    parser.add_argument("--image-size", type=int, default=None, help="input size (default: digits 32, imagefolder 224)")
    parser.add_argument("--epochs", type=int, default=epochs, help="total epochs")
    parser.add_argument("--frt-epochs", type=int, default=frt_epochs,
                        help="full-rank epochs before Facto (the earliest switch, with --switch auto)")
    parser.add_argument("--switch", default=switch, choices=SWITCHES,
                        help="auto: Facto waits while the full-rank loss is above half of chance (ln classes / 2); "
                             "fixed: it starts after --frt-epochs regardless")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per process")
    parser.add_argument("--lr", type=float, default=lr, help="learning rate")
    parser.add_argument("--lr-milestones", type=int, nargs="*", default=None,
                        help="epochs where the learning rate drops by --lr-gamma (default: where Facto starts, "
                             "--frt-epochs or later under --switch auto)")
    parser.add_argument("--lr-gamma", type=float, default=defaults.lr_gamma, help="LR factor at each milestone")
    parser.add_argument("--optimizer", default=defaults.optimizer, choices=OPTIMIZERS, help="optimizer")
    parser.add_argument("--momentum", type=float, default=defaults.momentum, help="SGD momentum")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="weight decay")
    parser.add_argument("--clip-grad-norm", type=float, default=defaults.clip_grad_norm,
                        help="clip the gradients' global norm to this before each step (0: off; "
                             "default: 1.0 for models without batch-norm, off for the rest)")
    parser.add_argument("--scalar-lr", type=float, default=defaults.scalar_lr,
                        help="learning-rate factor of 1-element parameters (Fixup's scalar biases and scales)")
    parser.add_argument("--merge-every", type=int, default=None, help="steps between merges (default: an epoch)")
    parser.add_argument("--low-rank-lr", type=float, default=defaults.low_rank_lr,
                        help="learning-rate factor of Facto's M (it starts at zero after every merge)")
    parser.add_argument("--scale", default=defaults.scale, choices=SCALES,
                        help="norm of D's rows: unbiased (an SGD step on M is in expectation the full-rank step) "
                             "or paper (eq. 13: sqrt(R/I) of it)")
    parser.add_argument("--direction", default=defaults.direction, choices=DIRECTIONS,
                        help="how Facto's directions D are drawn at each merge: gaussian (the paper), orthonormal, "
                             "or gradient (the top singular directions of each layer's weight gradient on a quarter "
                             "of a batch: one more forward and backward per merge)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (fp16 with loss scaling on older GPUs)")
    parser.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seeds weights, data order and D")
    parser.add_argument("--limit-batches", type=int, default=None,
                        help="at most this many batches per epoch (default: all)")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="data-loading processes")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _add_facto_options(parser)


def _train_config(args: argparse.Namespace) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    if values.get("lr_milestones") is not None:
        values["lr_milestones"] = tuple(values["lr_milestones"])
    check_model_name(values["model"])  # before any data is loaded
    return TrainConfig(**values)


def train_command(args: argparse.Namespace) -> int:
    """Full-rank, then Facto training on real data; checkpoints each epoch, exports a dense model."""
    from facto_fx.training import train

    result = train(_train_config(args))
    if result.out is not None and result.history:
        print(f"checkpoint, dense model and history in {result.out}/")
        if result.report is not None and not args.no_plots:
            _plot_run(result)
    return 0


def _plot_run(result) -> None:
    """The demo's pictures of one run: saved bytes and compression per layer, training curves."""
    try:
        from facto_fx.plots import plot_layer_memory, plot_layer_ratios, plot_training_curves

        paths = [plot_layer_memory(result.report, result.out / "memory_per_layer.png"),
                 plot_layer_ratios(result.report, result.out / "compression_per_layer.png"),
                 plot_training_curves({result.config.model: result.history}, result.out / "training_curves.png")]
    except RuntimeError as error:  # matplotlib missing: the run itself is complete
        print(f"no plots: {error}")
        return
    for path in paths:
        print(f"plot: {path}")


def demo_command(args: argparse.Namespace) -> int:
    """Vanilla vs Facto on the bundled digits: accuracy, saved bytes, plots."""
    from facto_fx.demo import run_demo

    run_demo(_train_config(args), args.out, plots=not args.no_plots)
    return 0


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, unless the help already says it (an option whose default
    is None explains in words what happens without it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facto-fx", description="Facto-CNN: train CNNs in less memory.")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="feature-map bytes per layer, vanilla vs Facto (paper Table 3)",
                              formatter_class=_DefaultsFormatter)
    report.add_argument("--model", default="vgg16", help="a torchvision classification model or a package model")
    report.add_argument("--batch-size", type=int, default=256, help="batch of the report")
    report.add_argument("--image-size", type=int, default=224, help="input height and width")
    report.add_argument("--in-channels", type=int, default=3, help="input channels")
    report.add_argument("--num-classes", type=int, default=1000, help="classifier outputs")
    report.add_argument("--plot", default=None,
                        help="write a per-op breakdown picture to this path (.png/.svg; default: none)")
    report.add_argument("--peak", action="store_true",
                        help="also measure the peak memory of a forward + backward (allocates a real model and batch)")
    report.add_argument("--device", default="auto", help="with --peak: auto, cpu, cuda or cuda:N")
    _add_facto_options(report)
    report.set_defaults(run=report_command)

    train = commands.add_parser("train", help="full-rank then Facto training, with checkpoints and resume",
                              formatter_class=_DefaultsFormatter)
    _add_training_options(train, epochs=TrainConfig.epochs, frt_epochs=TrainConfig.frt_epochs, lr=TrainConfig.lr,
                          switch=TrainConfig.switch)
    train.add_argument("--out", default="runs/facto", help="folder for checkpoint.pt, model_dense.pt, history.json")
    train.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    train.add_argument("--no-plots", action="store_true", help="skip the plots (no matplotlib needed)")
    train.add_argument("--checkpoint-every", type=int, default=None,
                       help="also checkpoint every N optimizer steps (default: only at each epoch's end)")
    train.set_defaults(run=train_command)

    demo = commands.add_parser("demo", help="vanilla vs Facto on scikit-learn's digits, with plots (about 2 min)",
                              formatter_class=_DefaultsFormatter)
    # A side-by-side on one declared schedule: Facto starts where it says, even in a quick run.
    _add_training_options(demo, epochs=3, frt_epochs=1, lr=0.01, switch="fixed")
    demo.add_argument("--out", default="facto-demo", help="folder for the plots")
    demo.add_argument("--no-plots", action="store_true", help="skip the plots (no matplotlib needed)")
    demo.set_defaults(run=demo_command)
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
