"""How large each layer's error bound is: absolute, relative to the tensor's value range, or
adaptive (COMET eq. 1, shared/papers/error-bounded-lossy-compression.txt), and what the layer's
codes kept last time (its eb and compression ratio, for the report and the training log).

**Adaptive bound.** A uniform error in [−eb, eb] on the nonzero inputs of a conv / linear layer
gives each weight-gradient element an error of standard deviation ≈ a·eb·L̄·√(N·R), a = 1/√3 (the
standard deviation of a uniform error of half-width 1), L̄ the mean |grad_Y|, N the terms summed
per weight element (batch × output positions), R the share of nonzero inputs. Solving for a
tolerated gradient error σ gives COMET's

    eb = σ / (a · L̄ · √(N · R)).

σ = `sigma` × the standard deviation of the layer's weight gradient. The default sigma = 0.1 adds
1 % to the gradient's variance, well inside the noise of a mini-batch gradient (its variance is of
the order of the gradient's own), so the compression error is invisible to SGD; COMET picks σ in
the same spirit ("the acceptable error distribution in the gradient"). The statistics are taken on
an uncompressed step (the layer keeps its input that step), the first and then every `every`-th
training call, and the eb they give holds until the next such step.

The error model holds while the quantisation step is small against the map's spread; where eq. 1
asks for more (a map with few nonzero values and a small gradient, such as the input images of the
first layer), the error is no longer uniform but −x itself, and grad_W would lose its signal. The
bound is therefore capped at half the map's standard deviation (step 2eb ≤ its std).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from facto_fx.eb_format import check_bound

UNIFORM_STD = 1 / math.sqrt(3)  # a: std of a uniform error on [-1, 1]
CAP_OF_STD = 0.5  # the adaptive bound's ceiling, in standard deviations of the map
MIN_BOUND = 1e-37  # the smallest eb with a normal fp32 step (eb_format.check_bound)


class ErrorBound:
    """One layer's bound: exactly one of `eb` (absolute), `relative` (× the tensor's value range,
    max − min, SZ's relative bound) or `sigma` (adaptive, refreshed every `every` training calls)."""

    def __init__(self, eb: float | None = None, relative: float | None = None, sigma: float | None = None,
                 every: int = 100) -> None:
        if sum(v is not None for v in (eb, relative, sigma)) != 1:
            raise ValueError("give exactly one of eb (absolute), relative (× value range) or sigma (adaptive)")
        self.absolute = None if eb is None else check_bound(eb)
        self.relative, self.sigma, self.every = relative, sigma, every
        self.calls = 0
        self.adaptive_eb: float | None = None
        self.eb: float | None = None  # the bound of the last compressed call
        self.kept_bytes = self.dense_bytes = 0  # of the last call's feature maps
        self._weight_hook: RemovableHandle | None = None  # the pending measurement's, at most one

    @property
    def ratio(self) -> float:
        """Dense bytes over the codes' bytes, last call (nan before any)."""
        return self.dense_bytes / self.kept_bytes if self.kept_bytes else float("nan")

    def choose(self) -> Callable[[Tensor], float] | None:
        """For this training call, the eb of each saved map (a relative bound: from that map's own
        range, whether the op saves its input or its output); None: keep them exact and measure."""
        self.calls += 1
        if self.absolute is not None:
            return lambda _t: self.absolute
        if self.relative is not None:
            return lambda t: max(self.relative * _value_range(t), MIN_BOUND)
        if self.adaptive_eb is None or (self.calls - 1) % self.every == 0:
            return None
        eb = self.adaptive_eb
        return lambda _t: eb

    def state_dict(self) -> dict:
        """What a resumed run needs to choose the same bounds: the call count and the adaptive eb."""
        return {"calls": self.calls, "adaptive_eb": self.adaptive_eb}

    def load_state_dict(self, state: dict) -> None:
        self.calls, self.adaptive_eb = int(state["calls"]), state["adaptive_eb"]

    def record(self, eb: float, kept: int, dense: int) -> None:
        self.eb, self.kept_bytes, self.dense_bytes = eb, kept, dense

    def measure(self, x: Tensor, y: Tensor, weight: Tensor) -> None:
        """Take eq. 1's statistics from this (uncompressed) call's input, output gradient and weight
        gradient; the new eb applies from the next call."""
        if not (y.requires_grad and weight.requires_grad):
            return
        nonzero = (x != 0).float().mean().item()
        cap = CAP_OF_STD * x.detach().float().std().item()
        terms = y.numel() // weight.shape[0]
        grad_y_mean: list[float] = []

        def on_grad_y(grad: Tensor) -> None:
            grad_y_mean.append(grad.abs().float().mean().item())

        def on_grad_w(grad: Tensor) -> None:
            self._weight_hook.remove()
            self._weight_hook = None
            if grad_y_mean and grad_y_mean[0] > 0 and nonzero > 0:
                sigma = self.sigma * grad.float().std().item()
                eb = sigma / (UNIFORM_STD * grad_y_mean[0] * math.sqrt(terms * nonzero))
                if math.isfinite(eb) and eb > 0:
                    self.adaptive_eb = min(max(min(eb, cap), MIN_BOUND), 1e38)

        y.register_hook(on_grad_y)
        if self._weight_hook is not None:  # a measured call whose backward never ran
            self._weight_hook.remove()
        self._weight_hook = weight.register_hook(on_grad_w)

    def __repr__(self) -> str:
        if self.absolute is not None:
            return f"eb={self.absolute:g}"
        if self.relative is not None:
            return f"relative={self.relative:g}"
        return f"sigma={self.sigma:g}, every={self.every}"


def _value_range(x: Tensor) -> float:
    """max − min over the finite values (NaN / inf are stored exactly anyway); 1 for a constant map,
    where any bound reconstructs every element within itself."""
    lo, hi = torch.aminmax(x.detach())
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        finite = x.detach()[torch.isfinite(x)]
        lo, hi = (finite.min(), finite.max()) if finite.numel() else (lo.new_zeros(()), lo.new_zeros(()))
    span = (hi.float() - lo.float()).item()
    return span if span > 0 else 1.0
