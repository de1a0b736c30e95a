"""Train a torchvision model with a hand-written loop: full-rank first, then Facto at the learning-rate drop.

What it shows, in the order a real run needs it:

- full-rank epochs on the plain model (bf16 autocast, channels_last);
- at the drop (lr x0.1): `facto_fx.compile(model, calibration_data=...)`, a new SGD whose `M` matrices
  (`facto_fx.low_rank_parameters`) train at 4x the rate without weight decay, and `facto_fx.attach`
  to merge `W <- W + M·D` once per epoch;
- the memory saved (`facto_fx.report`), the test accuracy, and `facto_fx.export_dense`: a plain
  torchvision model with merged weights, saved as a state_dict.

Run it (resnet18 on the bundled digits, 32x32, 10 classes; needs scikit-learn):

    python examples/torchvision_train.py                   # a few minutes on a CPU
    python examples/torchvision_train.py --smoke           # tiny sizes, end to end in seconds
    python examples/torchvision_train.py --compile --out runs/r18   # torch.compile the Facto model
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Subset

import facto_fx
from facto_fx.training import TrainConfig
from facto_fx.training.data import load_splits

WEIGHT_DECAY = 5e-4
LOW_RANK_LR = TrainConfig.low_rank_lr  # 4: M restarts from zero at every merge, so it trains faster


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="any torchvision classification model")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--frt-epochs", type=int, default=3, help="full-rank epochs before Facto (~30 %% of the run)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05, help="full-rank rate; Facto starts at a tenth of it")
    parser.add_argument("--calibration-batches", type=int, default=8, help="batches re-estimating batch-norm stats")
    parser.add_argument("--no-amp", action="store_true",
                        help="fp32 instead of bf16 autocast (CPUs without bf16 instructions emulate it, slowly)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the Facto model (slow to start on CPU)")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default torch's; --smoke uses 1: tiny batches gain nothing from "
                             "more, and on a busy machine multi-threaded ops stall waiting for each other)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="folder for the dense model (default ./facto-run)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds: checks the script runs")
    args = parser.parse_args(argv)
    if args.smoke:  # 3 epochs of 6 small batches: enough to see the loss fall and a merge happen
        args.epochs, args.frt_epochs, args.batch_size, args.calibration_batches = 3, 2, 32, 2
        args.threads = args.threads or 1
    if not 0 < args.frt_epochs < args.epochs:
        parser.error("--frt-epochs must be at least 1 and less than --epochs (Facto starts from a trained model)")
    return args


@contextlib.contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `count` for the block (None: left as it is), then restored."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pick_device(name: str) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)


def make_loaders(args: argparse.Namespace) -> tuple[DataLoader, DataLoader, int]:
    """scikit-learn's digits as 3-channel 32x32 images (the package's own copy, seeded 80/20 split)."""
    splits = load_splits("digits", image_size=32)
    train, test = splits.train, splits.test
    if args.smoke:
        train, test = Subset(train, range(6 * args.batch_size)), Subset(test, range(64))
    shuffle = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True, generator=shuffle)
    return train_loader, DataLoader(test, batch_size=256), splits.num_classes


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast; Facto's ops follow the aten ops they replace (conv and linear run in bf16)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def batches(loader: DataLoader, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches on `device`, images in channels_last to match the model's weights."""
    for x, y in loader:
        yield x.to(device, memory_format=torch.channels_last, non_blocking=True), y.to(device, non_blocking=True)


def train_epoch(model: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer, device: torch.device,
                amp: bool) -> float:
    """One epoch; the mean training loss. Facto needs nothing here: attach's hooks run on opt.step()."""
    model.train()
    total, seen = 0.0, 0
    for x, y in batches(loader, device):
        opt.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        total, seen = total + loss.item() * len(y), seen + len(y)
    return total / seen


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool) -> float:
    model.eval()
    correct = seen = 0
    for x, y in batches(loader, device):
        with autocast(device, amp):
            correct += (model(x).argmax(1) == y).sum().item()
        seen += len(y)
    return correct / seen


def facto_parameter_groups(fmodel: nn.Module, lr: float) -> list[dict]:
    """M in its own group: 4x the rate and no weight decay (W is decayed by the hooks, paper eq. 14)."""
    low_rank = facto_fx.low_rank_parameters(fmodel)
    low_rank_ids = {id(p) for p in low_rank}
    others = [p for p in fmodel.parameters() if p.requires_grad and id(p) not in low_rank_ids]
    return [{"params": low_rank, "lr": LOW_RANK_LR * lr, "weight_decay": 0.0}, {"params": others}]


def facto_optimizer(fmodel: nn.Module, lr: float, momentum: float = 0.9) -> torch.optim.SGD:
    """SGD over facto_parameter_groups."""
    return torch.optim.SGD(facto_parameter_groups(fmodel, lr), lr=lr, momentum=momentum, weight_decay=WEIGHT_DECAY)


def main(argv: list[str] | None = None) -> dict:
    """Train, switch to Facto, evaluate and export; returns the losses, accuracy, paths and models."""
    args = parse_args(argv)
    with cpu_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    """The run itself, apart from main() so that the thread count is restored however it ends."""
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    amp = not args.no_amp
    train_loader, test_loader, num_classes = make_loaders(args)

    model = torchvision.models.get_model(args.model, num_classes=num_classes)
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=WEIGHT_DECAY)
    losses: list[float] = []
    for epoch in range(args.frt_epochs):
        losses.append(train_epoch(model, train_loader, opt, device, amp))
        print(f"epoch {epoch + 1} full-rank: loss {losses[-1]:.4f}")

    # The learning-rate drop: low-rank training starts here (the paper's regime). compile shares the
    # model's weights (no copy) and re-estimates its batch-norm statistics on a few training batches.
    lr = args.lr * 0.1
    calibration = [x for x, _ in itertools.islice(batches(train_loader, device), args.calibration_batches)]
    example = calibration[0][:2]  # verification runs on it: the model is checked at M = 0 before training
    fmodel = facto_fx.compile(model, calibration_data=calibration, example_inputs=example)
    opt = facto_optimizer(fmodel, lr)
    hooks = facto_fx.attach(fmodel, opt, merge_every=len(train_loader), w_decay=lr * WEIGHT_DECAY)
    trained = torch.compile(fmodel) if args.compile else fmodel  # the facto_fx verbs take either
    for epoch in range(args.frt_epochs, args.epochs):
        losses.append(train_epoch(trained, train_loader, opt, device, amp))
        print(f"epoch {epoch + 1} facto: loss {losses[-1]:.4f} ({hooks.merges} merges)")
    accuracy = evaluate(trained, test_loader, device, amp)
    print(f"test accuracy {accuracy:.3f}")

    report = facto_fx.report(fmodel, calibration[0])  # print(report) gives the table, layer by layer
    print(f"saved for backward on a batch of {len(calibration[0])}: vanilla {report.vanilla_bytes / 2**20:.2f} MiB "
          f"-> Facto {report.facto_bytes / 2**20:.2f} MiB ({100 * report.ratio:.1f} %)")

    out = args.out or (Path(tempfile.mkdtemp(prefix="facto-example-")) if args.smoke else Path("facto-run"))
    out.mkdir(parents=True, exist_ok=True)
    dense = facto_fx.export_dense(fmodel)  # the original class, W + M·D merged: no facto_fx needed to load it
    path = out / f"{args.model}_dense.pt"
    torch.save(dense.state_dict(), path)
    print(f"dense model: {path} (torchvision.models.{args.model}(num_classes={num_classes}).load_state_dict)")
    return {"losses": losses, "test_accuracy": accuracy, "dense_path": path, "num_classes": num_classes,
            "merges": hooks.merges, "report": report, "fmodel": fmodel, "example": example}


if __name__ == "__main__":
    main()
