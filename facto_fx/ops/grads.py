"""Shared autograd plumbing of the facto ops.

Each op returns (y, saved code) with the code marked non-differentiable. Autograd would otherwise
allocate a zero gradient for the code on every backward; the ops switch that off
(`ctx.set_materialize_grads(False)`), so a backward reached with no gradient for y gets None.
"""

from __future__ import annotations

import functools
from collections.abc import Callable


def without_code_grad(backward: Callable) -> Callable:
    """Wrap an op's backward(ctx, grad_y, grad_code): a None grad_y means no input needs a gradient."""

    @functools.wraps(backward)
    def wrapped(ctx, grad_y, grad_code):
        if grad_y is None:
            return (None,) * len(ctx.needs_input_grad)
        return backward(ctx, grad_y, grad_code)

    return wrapped
