"""Fresh autograd leaves, so an op and its dense reference each get their own gradients."""

import torch


def leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    """A detached copy of `t` that requires grad (None stays None)."""
    return None if t is None else t.detach().clone().requires_grad_(True)
