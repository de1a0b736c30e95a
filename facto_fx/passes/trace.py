"""Tracer and shape propagation: a graph that computes what the model computes, in both modes.

symbolic_trace runs a module's Python once, so whatever it reads of `self.training` is frozen into
the graph; it also stops at the first sub-module it cannot follow. This tracer:

- keeps as opaque calls (leaves) the sub-modules it must not enter: those the user names, those
  carrying hooks or parametrizations (which only run when the module is called whole), those
  torch.fx cannot trace, and those whose code takes a different path in train and eval mode;
- traces the model in train and in eval mode and compares the two graphs: a flag that is True in
  one and False in the other (`F.batch_norm(..., training=...)`, `stochastic_depth(..., training)`)
  becomes a read of the owning module's `training` attribute at run time, and any other difference
  makes the owning sub-module a leaf;
- with `freeze_batch_norm`, traces batch-norm modules in eval mode, the form the pass freezes them
  into, so subclasses such as timm's BatchNormAct2d yield matchable `F.batch_norm` calls;
- otherwise lifts the batch counter out of the batch-norm forwards it traces into: their in-place
  `num_batches_tracked.add_(1)` would run once at trace time and never again, so it is hidden
  while tracing and the graph counts batches itself (`count_batch`), in training, before each
  such `F.batch_norm`. With momentum=None the count sets the averaging factor, which the trace
  would freeze: such a module is kept as one call.

Every leaf the tracer chose is recorded, with its reason, in `gm.meta["opaque_modules"]`.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import parametrize

OPAQUE_META = "opaque_modules"


class FactoTraceError(RuntimeError):
    """The model cannot be traced symbolically; the message names the module and source line."""


class FactoTracer(fx.Tracer):
    """symbolic_trace's tracer, plus extra leaf modules and a record of the module being traced."""

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


class ModeFlag(nn.Module):
    """Holds nothing: its `training` attribute follows `fmodel.train()` / `.eval()`.

    Graphs read it where the model's own forward read `self.training`.
    """


MODE_FLAG = "facto_mode"


def _user_frame(error: BaseException) -> str:
    """The innermost traceback frame outside torch: the line of model code that failed."""
    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(skip)]
    if not frames:
        return "unknown location"
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}: {frame.line}"


def hook_reason(module: nn.Module) -> str | None:
    """Why a module must be called whole: state that runs only through nn.Module.__call__."""
    if parametrize.is_parametrized(module):
        names = ", ".join(module.parametrizations.keys())
        return f"parametrized ({names}); it is kept as one call so the parametrization still runs"
    hooks = [
        kind for kind, table in (
            ("forward pre-hooks", module._forward_pre_hooks), ("forward hooks", module._forward_hooks),
            ("backward hooks", module._backward_hooks), ("backward pre-hooks", module._backward_pre_hooks),
        ) if table
    ]
    if hooks:
        return f"has {' and '.join(hooks)}; it is kept as one call so they still run"
    return None


def hooked_modules(model: nn.Module) -> dict[str, str]:
    """Sub-modules with hooks or parametrizations, outermost first, with the reason for each."""
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name or any(name.startswith(f"{outer}.") for outer in found):
            continue
        reason = hook_reason(module)
        if reason is not None:
            found[name] = reason
    return found


@torch.fx.node.has_side_effect
def count_batch(counter: torch.Tensor, training: bool) -> None:
    """A batch-norm's `num_batches_tracked += 1` in training, the in-place update of its forward
    that a trace cannot repeat, made a graph node (kept though nothing uses its output)."""
    if training:
        counter.add_(1)


def _counted(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """Batch-norm modules whose batch counter the trace lifts: counting, with a fixed momentum."""
    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        and m.num_batches_tracked is not None and m.momentum is not None
    }


def _why_counted(module: nn.Module) -> str:
    """What else a batch-norm that counts in place uses its count for (the trace lifts the rest)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is None:
        return " (momentum=None: it averages its statistics by 1 / that count, which the graph would freeze)"
    return ""


@contextmanager
def _counters_hidden(modules: dict[str, nn.modules.batchnorm._BatchNorm]) -> Iterator[None]:
    """Set each module's `num_batches_tracked` to None while tracing, so its forward skips the count."""
    counters = {name: m.num_batches_tracked for name, m in modules.items()}
    try:
        for m in modules.values():
            m.num_batches_tracked = None
        yield
    finally:
        for name, m in modules.items():
            m.num_batches_tracked = counters[name]


def _count_batches(gm: fx.GraphModule, modules: dict[str, nn.modules.batchnorm._BatchNorm]) -> None:
    """Before each traced `F.batch_norm` of a module whose counter was hidden, count the batch
    when the graph runs in training (the flag the call reads)."""
    for node in list(gm.graph.nodes):
        owner = owner_module(node)
        if node.op != "call_function" or node.target is not F.batch_norm or owner not in modules:
            continue
        training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training", False)
        container = gm.get_submodule(owner)
        if getattr(container, "num_batches_tracked", None) is None:
            container.register_buffer("num_batches_tracked", modules[owner].num_batches_tracked)
        with gm.graph.inserting_before(node):
            counter = gm.graph.get_attr(f"{owner}.num_batches_tracked")
            gm.graph.call_function(count_batch, (counter, training))
    gm.recompile()


@contextmanager
def modes(model: nn.Module, training: bool, freeze_batch_norm: bool = False) -> Iterator[None]:
    """Put every module in `training` mode (batch-norm in eval if frozen); restore each on exit."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.train(training)
        if freeze_batch_norm:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        yield
    finally:
        for m, mode in saved:
            m.training = mode


class _Untraceable(Exception):
    def __init__(self, module: str | None, error: BaseException) -> None:
        super().__init__(module)
        self.module, self.error = module, error


def _trace_once(model: nn.Module, leaves: Sequence[str]) -> fx.Graph:
    tracer = FactoTracer(leaves)
    try:
        return tracer.trace(model)
    except Exception as error:
        raise _Untraceable(tracer.failed_in, error) from error


def _stack(node: fx.Node) -> list[str]:
    """Qualified names of the modules whose forward created `node`, innermost first."""
    return [path for path, _ in reversed((node.meta.get("nn_module_stack") or {}).values())]


def owner_module(node: fx.Node) -> str:
    """Qualified name of the innermost module whose forward created `node` ("" for the root)."""
    return next(iter(_stack(node)), "")


def _same(a: object, b: object) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.name == b.name
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict) or isinstance(b, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _signature(node: fx.Node) -> tuple:
    return node.op, node.target, node.name, len(node.args), tuple(node.kwargs)


FlagSite = tuple[fx.Node, int | str]  # a node of the train graph and the arg index / kwarg name


def _compare_modes(train: fx.Graph, evaluation: fx.Graph) -> tuple[list[FlagSite], list[fx.Node]]:
    """Arguments that are True in the train graph and False in the eval graph (mode flags), and
    the first nodes where the graphs differ in any other way (empty if they do not)."""
    flags: list[FlagSite] = []
    train_nodes, eval_nodes = list(train.nodes), list(evaluation.nodes)
    for t, e in zip(train_nodes, eval_nodes, strict=False):
        if _signature(t) != _signature(e):
            return flags, [t, e]
        pairs = [*enumerate(zip(t.args, e.args, strict=True)), *((k, (t.kwargs[k], e.kwargs[k])) for k in t.kwargs)]
        for where, (a, b) in pairs:
            if _same(a, b):
                continue
            if a is True and b is False:
                flags.append((t, where))
            else:
                return flags, [t, e]
    longer = train_nodes[len(eval_nodes):] or eval_nodes[len(train_nodes):]
    return flags, longer[:1]


def _owned(graph: fx.Graph, module: str) -> list[tuple[str, str]]:
    return [(n.op, str(n.target)) for n in graph.nodes if module in _stack(n)]


def _mode_culprit(train: fx.Graph, evaluation: fx.Graph, diverging: list[fx.Node], skip: dict[str, str]) -> str:
    """The innermost module, not in `skip`, whose own nodes differ between the two graphs ("" for
    the root)."""
    candidates = [m for node in diverging for m in _stack(node) if m not in skip]
    for module in candidates:
        if _owned(train, module) != _owned(evaluation, module):
            return module
    return ""


@contextmanager
def _buffer_guard(model: nn.Module) -> Iterator[dict[str, str]]:
    """Yield the sub-modules whose buffers change while tracing (an in-place update that the
    graph cannot repeat, such as BatchNormAct2d's `num_batches_tracked.add_(1)`); restore them."""
    before = {name: (b, b._version, b.clone()) for name, b in model.named_buffers()}
    changed: dict[str, str] = {}
    try:
        yield changed
    finally:
        with torch.no_grad():
            for name, (buffer, version, value) in before.items():
                if buffer._version != version:
                    buffer.copy_(value)
                    owner, _, attr = name.rpartition(".")
                    why = f"updates its buffer '{attr}' in place, which a traced graph would not repeat"
                    changed.setdefault(owner, why)


def _read_mode_flags(gm: fx.GraphModule, model: nn.Module, flags: list[FlagSite]) -> None:
    """Replace each constant mode flag with `owner.training`, read when the graph runs."""
    for node, where in flags:
        owner = owner_module(node)
        path = owner or MODE_FLAG
        try:
            gm.get_submodule(path)
        except AttributeError:
            gm.add_submodule(path, model.get_submodule(owner) if owner else ModeFlag())
        with gm.graph.inserting_before(node):
            flag = gm.graph.call_function(getattr, (gm.graph.get_attr(path), "training"))
        if isinstance(where, int):
            node.args = (*node.args[:where], flag, *node.args[where + 1 :])
        else:
            node.kwargs = {**node.kwargs, where: flag}
    gm.recompile()


def _trace_error(model: nn.Module, failure: _Untraceable, strict: bool) -> FactoTraceError:
    failing = failure.module or ""
    where = f"sub-module '{failing}'" if failing else f"{type(model).__name__}.forward"
    if not failing:
        hint = "move the data-dependent code into a sub-module and pass its name in leaf_modules"
    elif strict:
        hint = (
            f"pass leaf_modules=['{failing}'] to facto_fx.compile to keep that sub-module as an opaque "
            "call (it then stays dense and trainable), or strict=False to do so automatically"
        )
    else:
        hint = f"pass leaf_modules=['{failing}'] to keep that sub-module as an opaque call"
    error = failure.error
    return FactoTraceError(
        f"torch.fx could not trace {where} at {_user_frame(error)}\n"
        f"  cause: {type(error).__name__}: {error}\n  fix: {hint}"
    )


def _mode_error(model: nn.Module, node: fx.Node) -> FactoTraceError:
    return FactoTraceError(
        f"{type(model).__name__}.forward computes differently in train and eval mode (first at node "
        f"'{node.name}'), and a traced graph records only one of the two\n"
        "  fix: move the mode-dependent code into a sub-module of its own; it is then kept as one call. If the "
        "difference is an auxiliary output used only in training, build the model without it (torchvision's "
        "inception_v3 / googlenet: aux_logits=False)"
    )


def trace(
    model: nn.Module, leaf_modules: Sequence[str] = (), *, freeze_batch_norm: bool = False, strict: bool = False
) -> fx.GraphModule:
    """Trace `model` into a GraphModule that follows `.train()` / `.eval()` like the model does.

    Untraceable and mode-dependent sub-modules become opaque leaves, listed with their reasons in
    `gm.meta["opaque_modules"]`; with strict=True an untraceable sub-module raises FactoTraceError
    instead. The root's own forward must trace (FactoTraceError otherwise).
    """
    names = {name for name, _ in model.named_modules()}
    unknown = sorted(set(leaf_modules) - names)
    if unknown:
        raise ValueError(f"leaf_modules {unknown} are not sub-modules of {type(model).__name__}")
    opaque = {name: "named in leaf_modules" for name in leaf_modules}
    opaque.update({k: v for k, v in hooked_modules(model).items() if k not in opaque})
    counted = {} if freeze_batch_norm else _counted(model)
    while True:
        try:
            with _buffer_guard(model) as mutated, _counters_hidden(counted):
                with modes(model, True, freeze_batch_norm):
                    train = _trace_once(model, list(opaque))
                with modes(model, False, freeze_batch_norm):
                    evaluation = _trace_once(model, list(opaque))
        except _Untraceable as failure:
            if strict or not failure.module or failure.module in opaque:
                raise _trace_error(model, failure, strict) from failure.error
            error = failure.error
            opaque[failure.module] = (
                f"torch.fx cannot trace it ({type(error).__name__}: {str(error).splitlines()[0][:160]} "
                f"at {_user_frame(error)}); kept as one call"
            )
            continue
        if mutated:
            if "" in mutated or set(mutated) <= set(opaque):
                raise FactoTraceError(
                    f"{type(model).__name__}.forward updates buffers in place ({mutated}), which a traced graph "
                    "would not repeat\n  fix: move that update into the forward of the module that owns the buffer"
                )
            opaque.update({k: f"{v}{_why_counted(model.get_submodule(k))}; kept as one call"
                           for k, v in mutated.items() if k not in opaque})
            continue
        flags, diverging = _compare_modes(train, evaluation)
        if not diverging:
            break
        owner = _mode_culprit(train, evaluation, diverging, opaque)
        if not owner:
            raise _mode_error(model, diverging[0])
        opaque[owner] = "computes differently in train and eval mode; kept as one call so its mode is read at run time"
    gm = fx.GraphModule(model, train, type(model).__name__)
    if flags:
        _read_mode_flags(gm, model, flags)
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    _count_batches(gm, {name: m for name, m in counted.items() if name not in called})
    gm.meta[OPAQUE_META] = {name: reason for name, reason in opaque.items() if name in called}
    return gm


def propagate_shapes(gm: fx.GraphModule, *example_inputs: torch.Tensor) -> None:
    """Record each node's output shape and dtype in node.meta['tensor_meta'] (no grad, no copy).

    It runs in eval mode: in training, batch-norm on batch statistics would fold the examples
    into the model's running statistics and count them as a batch."""
    with torch.no_grad(), modes(gm, False):
        ShapeProp(gm).propagate(*example_inputs)
