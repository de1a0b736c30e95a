"""Training hooks: each method's per-optimizer-step action (Facto: W regularisation after every
step and merge-and-reinit every N steps, paper §3.1.3).

They hang on the optimizer's step post-hook, so a normal training loop needs no change.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from facto_fx.methods import Method, StepOptions, method_layers, method_parameters


def layers_by_method(model: nn.Module) -> dict[Method, list[nn.Module]]:
    """The layers methods created in `model` (by `compile` or the "facto" backend), per handler."""
    groups: dict[Method, list[nn.Module]] = {}
    for _, layer, handler in method_layers(model):
        groups.setdefault(handler, []).append(layer)
    return groups


_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its live FactoHooks


@dataclass(repr=False)
class FactoHooks:
    """Handle returned by `attach`: counts steps, runs each method's step action, `remove()` detaches."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    merge_every: int
    w_decay: float = 0.0
    probe: Callable[[], torch.Tensor] | None = None
    steps: int = 0
    merges: int = 0
    _handle: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.merge_every, bool) or not isinstance(self.merge_every, int) or self.merge_every < 1:
            raise ValueError(f"merge_every must be a positive number of optimizer steps; got {self.merge_every!r}")
        if not self.w_decay >= 0.0:
            raise ValueError(f"w_decay (λ of W ← W − λ·Ω) must be >= 0; got {self.w_decay!r}")
        if self.probe is not None and not callable(self.probe):
            raise ValueError(f"probe must be a function returning a loss; got {self.probe!r}")
        self.options = StepOptions(self.merge_every, self.w_decay, self.probe and self._probe_in_eval)
        self.groups = layers_by_method(self.model)
        if not self.groups:
            raise ValueError(
                "the model has no Facto (or other method) layers; was it built by facto_fx.compile, or run "
                "once through torch.compile(backend='facto')?"
            )
        tracked = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [p for p in method_parameters(self.model) if id(p) not in tracked]
        if missing:
            raise ValueError(
                f"{len(missing)} Facto layers' M are not in the optimizer; build it from fmodel.parameters()"
            )
        earlier = _ATTACHED.get(self.model)
        if earlier is not None and earlier._handle is not None:
            raise ValueError(
                f"hooks are already attached to this model ({earlier!r}); call .remove() on them first: two "
                "would each merge every period and decay W twice per step"
            )
        if any(getattr(layer, "direction", None) == "gradient" for layers in self.groups.values() for layer in layers):
            self._restart()  # the first directions from the gradient too, not drawn
        self._handle = self.optimizer.register_step_post_hook(self._after_step)
        _ATTACHED[self.model] = self

    def __repr__(self) -> str:
        layers = sum(len(group) for group in self.groups.values())
        state = "" if self._handle is not None else ", removed"
        return (f"FactoHooks({layers} layers, merge_every={self.merge_every}, w_decay={self.w_decay:g}, "
                f"steps={self.steps}, merges={self.merges}{state})")

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        reset = [handler.after_step(layers, optimizer, self.steps, self.options)
                 for handler, layers in self.groups.items()]
        self.merges += any(reset)

    def merge_and_reinit(self) -> None:
        """Restart every method's accumulated state now (Facto: W ← W + M·D, M ← 0, a fresh D, and
        M's optimizer state cleared)."""
        self._restart()
        self.merges += 1

    def _restart(self) -> None:
        for handler, layers in self.groups.items():
            handler.reset(layers, self.optimizer, self.options)

    def _probe_in_eval(self) -> torch.Tensor:
        """The probe's loss with every module in eval mode, so it moves no running statistics and
        drops nothing out; each module's mode is restored after."""
        modes = {module: module.training for module in self.model.modules()}
        self.model.eval()
        try:
            return self.probe()
        finally:
            for module, training in modes.items():
                module.training = training

    def state_dict(self) -> dict:
        return {"steps": self.steps, "merges": self.merges}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.merges = state["steps"], state["merges"]

    def remove(self) -> None:
        """Detach from the optimizer; the model keeps its current weights."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
            if _ATTACHED.get(self.model) is self:
                del _ATTACHED[self.model]


def attach(
    model: nn.Module, optimizer: torch.optim.Optimizer, merge_every: int, w_decay: float = 0.0,
    probe: Callable[[], torch.Tensor] | None = None,
) -> FactoHooks:
    """Run each method's step action after every optimizer step (Facto: W ← W − w_decay·Ω, and
    merge-and-reinit every `merge_every` steps).

    probe: a function returning the loss on a few training samples (e.g. a quarter of a batch),
    which Facto layers with direction "gradient" take their directions from, here and at every
    merge; it runs with the model in eval mode, one extra forward and backward per merge."""
    return FactoHooks(model, optimizer, merge_every, w_decay, probe)
