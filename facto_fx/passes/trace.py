"""Tracer and shape propagation, with errors that say where tracing failed and what to do."""

from __future__ import annotations

import os
import traceback
from collections.abc import Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp


class FactoTraceError(RuntimeError):
    """The model cannot be traced symbolically; the message names the module and source line."""


class FactoTracer(fx.Tracer):
    """symbolic_trace's tracer, plus user leaf modules and a record of the module being traced."""

    def __init__(self, leaf_modules: Sequence[str] = ()) -> None:
        super().__init__()
        self.user_leaves = set(leaf_modules)
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.user_leaves or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # The innermost module sees the error first; outer modules keep its name.
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise


def _user_frame(error: BaseException) -> str:
    """The innermost traceback frame outside torch: the line of model code that failed."""
    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(skip)]
    if not frames:
        return "unknown location"
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}: {frame.line}"


def trace(model: nn.Module, leaf_modules: Sequence[str] = ()) -> fx.GraphModule:
    """symbolic_trace `model`; untraceable code raises FactoTraceError naming the module to exclude."""
    names = {name for name, _ in model.named_modules()}
    unknown = sorted(set(leaf_modules) - names)
    if unknown:
        raise ValueError(f"leaf_modules {unknown} are not sub-modules of {type(model).__name__}")
    tracer = FactoTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as error:
        failing = tracer.failed_in or ""
        where = f"sub-module '{failing}'" if failing else f"{type(model).__name__}.forward"
        hint = (
            f"pass leaf_modules=['{failing}'] to facto_fx.compile to keep that sub-module as an "
            "opaque call (it then stays dense and trainable)"
            if failing
            else "move the data-dependent code into a sub-module and pass its name in leaf_modules"
        )
        raise FactoTraceError(
            f"torch.fx could not trace {where} at {_user_frame(error)}\n"
            f"  cause: {type(error).__name__}: {error}\n  fix: {hint}"
        ) from error
    name = model.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


def propagate_shapes(gm: fx.GraphModule, *example_inputs: torch.Tensor) -> None:
    """Record each node's output shape and dtype in node.meta['tensor_meta'] (no grad, no copy)."""
    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)
