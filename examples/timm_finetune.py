"""Fine-tune a timm model on a folder of images, choosing a memory-saving method per layer.

What it shows: `facto_fx.compile(model, facto_fx.FactoConfig(...))` where `methods={...}` picks a
method for some layers by name or selector, and `fallback=` covers what the others leave:

- Facto (low-rank W + M·D, compressed maps) on the first `--apply-ratio` of the convs from the input;
- HOSVD (`facto_fx.methods.HOSVD`) on the last two convs (`facto_fx.Last(2)`): they train their full
  weight and keep a truncated HOSVD of their input, the HOSVD paper's fine-tuning setting;
- the classifier left dense, by its exact name;
- ErrorBounded (`facto_fx.methods.ErrorBounded`) for every other op that saves a feature map
  (the input layer, layers beyond apply_ratio; SiLU / Hardswish, depthwise convs in other models).

`facto_fx.decisions(fmodel)` then says which method each layer got, and why.
(`facto_fx.presets.facto_error_bounded()` is the ready-made Facto + ErrorBounded config.)

The data: `--data-dir` holding `train/<class>/*.png` and `val/<class>/*.png` (torchvision's ImageFolder).
timm is an optional extra: `pip install timm`.

    python examples/timm_finetune.py --data-dir my_images --model resnet18 --epochs 5
    python examples/timm_finetune.py --pretrained --data-dir my_images   # ImageNet weights (downloads)
    python examples/timm_finetune.py --smoke     # writes a tiny folder of random PNGs first; seconds
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

import facto_fx
from facto_fx.methods import HOSVD, ErrorBounded


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="a timm model name (timm.list_models())")
    parser.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights (downloads)")
    parser.add_argument("--data-dir", type=Path, default=None, help="holds train/<class>/*.png and val/<class>/*.png")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--apply-ratio", type=float, default=0.6, help="share of layers from the input given Facto")
    parser.add_argument("--hosvd-eps", type=float, default=0.9, help="energy HOSVD keeps per mode, in (0, 1]")
    parser.add_argument("--eb", type=float, default=0.02, help="ErrorBounded's bound, relative to each map's range")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny random data and sizes: checks the script runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.image_size, args.epochs, args.batch_size = 32, 2, 8
    if args.data_dir is None and not args.smoke:
        parser.error("--data-dir is required (or --smoke, which makes a tiny folder of random images)")
    return args


def import_timm() -> ModuleType:
    """timm is not a dependency of facto_fx: say how to get it instead of a bare ImportError."""
    try:
        import timm
    except ImportError:
        sys.exit("timm_finetune.py needs timm, which facto_fx does not install: pip install timm")
    return timm


def write_random_images(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 8,
                        size: int = 40) -> Path:
    """A tiny ImageFolder tree of random PNGs, each class a different brightness so there is something to learn."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", per_class // 2)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 128, (size, size, 3)) + 100 * c
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def make_loaders(data_dir: Path, image_size: int, batch_size: int, seed: int) -> tuple[DataLoader, DataLoader, list]:
    """train/ and val/ as ImageFolders, resized, center-cropped and normalized as ImageNet models expect."""
    transform = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                                    transforms.ToTensor(),
                                    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    train = datasets.ImageFolder(str(data_dir / "train"), transform)
    val = datasets.ImageFolder(str(data_dir / "val"), transform)
    shuffle = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=shuffle),
            DataLoader(val, batch_size=batch_size), train.classes)


def facto_config(classifier: str, args: argparse.Namespace) -> facto_fx.FactoConfig:
    """Facto by apply_ratio, HOSVD on the last two convs, the classifier dense, ErrorBounded for the rest.

    An exact name beats a selector such as Last(n) or a glob pattern ("layer4.*"), which beats apply_ratio.
    """
    return facto_fx.FactoConfig(
        apply_ratio=args.apply_ratio,
        methods={facto_fx.Last(2): HOSVD(args.hosvd_eps), classifier: None},
        fallback=ErrorBounded(args.eb, relative=True),
    )


def print_decisions(fmodel: nn.Module, shown: int = 2) -> dict[str, str]:
    """How many layers each method got, with the first few and the reason; returns {layer: method}."""
    decisions = facto_fx.decisions(fmodel)
    print(f"methods per layer ({len(decisions)} layers considered; facto_fx.decisions(fmodel) lists them all):")
    by_method: dict[str, list] = {}
    for d in decisions:
        by_method.setdefault(d.label, []).append(d)
    for label, group in by_method.items():
        print(f"  {label:<8} {len(group):>3} layer{'s' if len(group) > 1 else ''}, e.g.")
        for d in group[:shown]:
            print(f"             {d.layer} ({d.kind}): {d.reason}")
    return {d.layer: d.label for d in decisions}


def train_epoch(model: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer) -> float:
    model.train()
    total, seen = 0.0, 0
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        total, seen = total + loss.item() * len(y), seen + len(y)
    return total / seen


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = seen = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        seen += len(y)
    return correct / seen


def main(argv: list[str] | None = None) -> dict:
    """Build the timm model, compile it with a method per layer, fine-tune; returns decisions, losses, accuracy."""
    args = parse_args(argv)
    timm = import_timm()
    with tempfile.TemporaryDirectory(prefix="facto-images-") as scratch:
        data_dir = args.data_dir or write_random_images(Path(scratch))
        return run(args, timm, data_dir)


def run(args: argparse.Namespace, timm: ModuleType, data_dir: Path) -> dict:
    """The fine-tuning itself, inside main()'s temporary image folder."""
    torch.manual_seed(args.seed)
    train_loader, val_loader, classes = make_loaders(data_dir, args.image_size, args.batch_size, args.seed)
    model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=len(classes))
    classifier = model.pretrained_cfg["classifier"]  # the head's name in this model: "fc", "classifier", "head.fc"

    # Fine-tuning starts from trained weights, so Facto goes on at once. The batch-norm statistics are
    # re-estimated on a few of the new images; a real batch as example_inputs checks the model at M = 0.
    calibration = [x for x, _ in itertools.islice(train_loader, 4)]
    fmodel = facto_fx.compile(model, facto_config(classifier, args), calibration_data=calibration,
                              example_inputs=calibration[0])
    chosen = print_decisions(fmodel)

    low_rank = facto_fx.low_rank_parameters(fmodel)  # Facto's M: 4x the rate, no weight decay
    low_rank_ids = {id(p) for p in low_rank}
    others = [p for p in fmodel.parameters() if p.requires_grad and id(p) not in low_rank_ids]
    opt = torch.optim.SGD([{"params": low_rank, "lr": 4 * args.lr, "weight_decay": 0.0}, {"params": others}],
                          lr=args.lr, momentum=0.9, weight_decay=5e-4)
    hooks = facto_fx.attach(fmodel, opt, merge_every=len(train_loader), w_decay=args.lr * 5e-4)
    losses = []
    for epoch in range(args.epochs):
        losses.append(train_epoch(fmodel, train_loader, opt))
        print(f"epoch {epoch + 1}: loss {losses[-1]:.4f} ({hooks.merges} merges)")
        for line in facto_fx.method_summaries(fmodel):  # what HOSVD and ErrorBounded kept in the last step
            print(f"  {line}")
    accuracy = evaluate(fmodel, val_loader)
    report = facto_fx.report(fmodel, calibration[0])  # measured on real data: HOSVD's ranks, ErrorBounded's codes
    print(f"val accuracy {accuracy:.3f}; saved for backward on a batch of {len(calibration[0])}: "
          f"{100 * report.ratio:.1f} % of vanilla's bytes")
    return {"decisions": chosen, "classifier": classifier, "losses": losses, "val_accuracy": accuracy,
            "report": report, "classes": classes}


if __name__ == "__main__":
    main()
