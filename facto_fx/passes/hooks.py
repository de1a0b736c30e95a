"""Training hooks: merge-and-reinit every N optimizer steps, and W regularisation (paper §3.1.3).

They hang on the optimizer's step post-hook, so a normal training loop needs no change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from facto_fx.dynamo_backend import low_rank_states
from facto_fx.layers import LOW_RANK_LAYERS


def low_rank_layers(model: nn.Module) -> list[nn.Module]:
    """Facto layers of a compiled model, or the "facto" torch.compile backend's states of a model."""
    return [m for m in model.modules() if isinstance(m, LOW_RANK_LAYERS)] or low_rank_states(model)


@dataclass
class FactoHooks:
    """Handle returned by `attach`: counts steps, merges on schedule, `remove()` detaches."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    merge_every: int
    w_decay: float = 0.0
    steps: int = 0
    merges: int = 0
    _handle: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.merge_every, bool) or not isinstance(self.merge_every, int) or self.merge_every < 1:
            raise ValueError(f"merge_every must be a positive number of optimizer steps; got {self.merge_every!r}")
        if not self.w_decay >= 0.0:
            raise ValueError(f"w_decay (λ of W ← W − λ·Ω) must be >= 0; got {self.w_decay!r}")
        self.layers = low_rank_layers(self.model)
        if not self.layers:
            raise ValueError("the model has no Facto conv / linear layers; was it built by facto_fx.compile?")
        tracked = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [m for m in self.layers if id(m.M) not in tracked]
        if missing:
            raise ValueError(
                f"{len(missing)} Facto layers' M are not in the optimizer; build it from fmodel.parameters()"
            )
        self._handle = self.optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        if self.w_decay:
            for layer in self.layers:
                layer.regularize(self.w_decay)
        if self.steps % self.merge_every == 0:
            self.merge_and_reinit()

    @torch.no_grad()
    def merge_and_reinit(self) -> None:
        """W ← W + M·D, M ← 0, a fresh D, and M's optimizer state cleared (momentum, moments, step)."""
        for layer in self.layers:
            layer.merge()
            layer.redraw()
            self.optimizer.state.pop(layer.M, None)
        self.merges += 1

    def state_dict(self) -> dict:
        return {"steps": self.steps, "merges": self.merges}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.merges = state["steps"], state["merges"]

    def remove(self) -> None:
        """Detach from the optimizer; the model keeps its current weights."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def attach(
    model: nn.Module, optimizer: torch.optim.Optimizer, merge_every: int, w_decay: float = 0.0
) -> FactoHooks:
    """Merge-and-reinit every `merge_every` optimizer steps; W ← W − w_decay·Ω after each step."""
    return FactoHooks(model, optimizer, merge_every, w_decay)
