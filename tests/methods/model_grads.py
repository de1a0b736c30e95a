"""Parameter gradients of a model for a fixed random projection of its output, and their distance."""

from __future__ import annotations

import torch
from torch import nn


def grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Each parameter's gradient (those that get one, in order); codes draw from torch's generator
    as it stands, so calls draw anew."""
    model.zero_grad(set_to_none=True)
    y = model(x)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def relative(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """|g − g_ref| / |g_ref| over all of them at once."""
    a, e = torch.cat([g.flatten() for g in actual]), torch.cat([g.flatten() for g in expected])
    return ((a - e).norm() / e.norm()).item()
