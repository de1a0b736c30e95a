"""What the digits benchmarks share: the small CNN, its SGD schedule, test accuracy, seed means.

Imported by hosvd_digits.py, eb_digits.py, recalibration.py, directions.py and switch_regimes.py (as
siblings).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import facto_fx
from facto_fx.methods import method_parameters
from facto_fx.training import TrainConfig


def small_cnn() -> nn.Sequential:
    """6 convs with batch-norm and ReLU, two max-pools, a linear classifier (32² digits, 10 classes)."""
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    features = [*block(3, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
                *block(64, 64), *block(64, 64)]
    return nn.Sequential(nn.Sequential(*features), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def train(model: nn.Module, data, epochs: int, lr: float, seed: int) -> None:
    """SGD (momentum 0.9, weight decay 5e-4) on the trainable parameters, batch 64, the data order a
    function of `seed`. Cosine decay to zero: every run ends converged on the same schedule, so a
    comparison is of final accuracies, not of how fast each run gets there."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    loader = torch.utils.data.DataLoader(data.train, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            schedule.step()


def run_epochs(model: nn.Module, loader, optimizer: torch.optim.Optimizer, count: int) -> None:
    """`count` epochs of cross-entropy steps in training mode, gradients set to None before each."""
    model.train()
    for _ in range(count):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()


def run_low_rank_epochs(fmodel: nn.Module, loader, lr: float, count: int, weight_decay: float = 5e-4,
                        low_rank_lr: float = TrainConfig.low_rank_lr) -> None:
    """`count` epochs of a Facto model as the README trains one: SGD (momentum 0.9) with weight decay
    on everything but M, M at low_rank_lr times the rate (TrainConfig's), W decayed by lr·weight_decay,
    merge-and-reinit every epoch."""
    low_rank = method_parameters(fmodel)
    ids = {id(p) for p in low_rank}
    others = [p for p in fmodel.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": low_rank, "weight_decay": 0.0, "lr": lr * low_rank_lr}, {"params": others}]
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    hooks = facto_fx.attach(fmodel, optimizer, merge_every=len(loader), w_decay=lr * weight_decay)
    run_epochs(fmodel, loader, optimizer, count)
    hooks.remove()


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    """Test accuracy in eval mode."""
    model.eval()
    x, y = data.test.tensors
    return (model(x).argmax(1) == y).float().mean().item()


def mean_over(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's mean over the seeds' runs."""
    return {key: sum(run[key] for run in runs) / len(runs) for key in runs[0]}
