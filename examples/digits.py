"""Train the CIFAR-size VGG11 on scikit-learn's bundled digits: full-rank first, then Facto.

    python examples/digits.py

One epoch of ordinary training, then `facto_fx.compile` for low-rank training with compressed
feature maps and merge-and-reinit hooks; prints the per-layer memory table and test accuracy.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import facto_fx
from facto_fx.models import cifar_vgg11


def digits_loaders(batch_size: int, seed: int) -> tuple[DataLoader, DataLoader]:
    """8×8 digits scaled to [0, 1] and upsampled to the 32×32 input the CIFAR VGG expects."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(y))
    train, test = order[:split], order[split:]
    g = torch.Generator().manual_seed(seed)
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True, generator=g),
        DataLoader(TensorDataset(x[test], y[test]), batch_size=256),
    )


def run_epoch(model, loader, optimizer, desc: str) -> float:
    model.train()
    bar = tqdm(loader, desc=desc, leave=False)
    for x, y in bar:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss.item()


@torch.no_grad()
def accuracy(model, loader) -> float:
    model.eval()
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    return correct / len(loader.dataset)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frt-epochs", type=int, default=1, help="full-rank epochs before compiling")
    parser.add_argument("--epochs", type=int, default=3, help="total epochs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--inr", type=float, default=0.3)
    parser.add_argument("--lossy-kernel", type=int, default=2)
    parser.add_argument("--apply-ratio", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    train, test = digits_loaders(args.batch_size, args.seed)
    model = cifar_vgg11(num_classes=10, in_channels=1, batch_norm=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    for epoch in range(args.frt_epochs):
        run_epoch(model, train, optimizer, f"full-rank epoch {epoch + 1}")
    print(f"after full-rank training: test accuracy {accuracy(model, test):.3f}")

    fmodel = facto_fx.compile(model, inr=args.inr, lossy_kernel=args.lossy_kernel, apply_ratio=args.apply_ratio)
    optimizer = torch.optim.SGD([p for p in fmodel.parameters() if p.requires_grad], lr=args.lr, momentum=0.9)
    hooks = facto_fx.attach(fmodel, optimizer, merge_every=len(train))
    for epoch in range(args.frt_epochs, args.epochs):
        run_epoch(fmodel, train, optimizer, f"facto epoch {epoch + 1}")
    acc = accuracy(fmodel, test)
    print(f"after Facto training ({hooks.merges} merges): test accuracy {acc:.3f}\n")
    report = facto_fx.report(fmodel, next(iter(train))[0])
    print(report)
    return {"accuracy": acc, "report": report}


if __name__ == "__main__":
    main()
