"""Shared autograd plumbing of the facto ops.

Each op returns (y, saved code, ...) with the codes marked non-differentiable. Autograd would otherwise
allocate a zero gradient for each code on every backward; `register_autograd` switches that off
(`ctx.set_materialize_grads(False)`), so a backward reached with no gradient for y gets None and
answers that no input needs a gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    """op.register_autograd, with no zero gradient materialised for the op's saved code."""

    def setup(ctx, inputs, output) -> None:
        setup_context(ctx, inputs, output)
        ctx.set_materialize_grads(False)

    @functools.wraps(backward)
    def wrapped(ctx, grad_y, *grad_codes):
        if grad_y is None:
            return (None,) * len(ctx.needs_input_grad)
        return backward(ctx, grad_y, *grad_codes)

    op.register_autograd(wrapped, setup_context=setup)


def records_gradient(*tensors: Tensor | None) -> bool:
    """Whether autograd records a call on `tensors` (None skipped): otherwise an op runs torch's own
    function, which saves nothing."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
