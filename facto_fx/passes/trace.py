"""Tracer and shape propagation: a graph that computes what the model computes, in both modes.

symbolic_trace runs a module's Python once, so whatever it reads of `self.training` is frozen into
the graph; it also stops at the first sub-module it cannot follow. This tracer:

- keeps as opaque calls (leaves) the sub-modules it must not enter: those the user names, those
  carrying hooks or parametrizations (which only run when the module is called whole), those
  torch.fx cannot trace, and those whose code takes a different path in train and eval mode;
- traces the model in train and in eval mode and pairs the nodes of the two graphs: a flag that is
  True in one and False in the other (`F.batch_norm(..., training=...)`, `stochastic_depth(...,
  training)`) becomes a read of the owning module's `training` attribute at run time; any other
  difference makes the owning sub-module a leaf, or, where the root's own forward differs (an
  auxiliary head run only in training), the two graphs are merged into one whose forward runs the
  nodes of the mode it is in (passes/mode_graph.py);
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

import difflib
import os
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import parametrize

from facto_fx.passes.mode_graph import merge_modes, same_mode

OPAQUE_META = "opaque_modules"


class FactoTraceError(RuntimeError):
    """The model cannot be traced symbolically; the message names the module and source line."""


class FactoTracer(fx.Tracer):
    """symbolic_trace's tracer, plus extra leaf modules and a record of the module being traced."""

    def __init__(self, leaf_modules: Sequence[str] = ()) -> None:
        super().__init__()
        self.user_leaves = set(leaf_modules)
        self.failed_in: str | None = None
        self.called: set[str] = set()  # every module the forward called, leaf or not

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.user_leaves or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            self.called.add(self.path_of_module(m))
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
            same_mode(node, counter, gm.graph.call_function(count_batch, (counter, training)))
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


def _trace_once(model: nn.Module, leaves: Sequence[str]) -> tuple[fx.Graph, set[str]]:
    """The graph, and the modules the forward called."""
    tracer = FactoTracer(leaves)
    try:
        return tracer.trace(model), tracer.called
    except Exception as error:
        raise _Untraceable(tracer.failed_in, error) from error


def _stack(node: fx.Node) -> list[str]:
    """Qualified names of the modules whose forward created `node`, innermost first."""
    return [path for path, _ in reversed((node.meta.get("nn_module_stack") or {}).values())]


def owner_module(node: fx.Node) -> str:
    """Qualified name of the innermost module whose forward created `node` ("" for the root)."""
    return next(iter(_stack(node)), "")


def _same(a: object, b: object, pairs: dict[fx.Node, fx.Node]) -> bool:
    """Whether argument `a` of a train node is argument `b` of an eval node (nodes by `pairs`)."""
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return isinstance(b, fx.Node) and pairs.get(b) is a
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y, pairs) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) or isinstance(b, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_same(a[k], b[k], pairs) for k in a)
    return type(a) is type(b) and a == b


FlagSite = tuple[fx.Node, int | str]  # a node of the train graph and the arg index / kwarg name


def _flags(t: fx.Node, e: fx.Node, pairs: dict[fx.Node, fx.Node]) -> list[FlagSite] | None:
    """The arguments True in train node `t` and False in eval node `e`, or None if the two differ
    in any other way."""
    if len(t.args) != len(e.args) or t.kwargs.keys() != e.kwargs.keys():
        return None
    flags: list[FlagSite] = []
    arguments = [*zip(range(len(t.args)), t.args, e.args, strict=True),
                 *((k, t.kwargs[k], e.kwargs[k]) for k in t.kwargs)]
    for where, a, b in arguments:
        if _same(a, b, pairs):
            continue
        if a is not True or b is not False:
            return None
        flags.append((t, where))
    return flags


def _key(node: fx.Node) -> tuple:
    return node.op, node.target, owner_module(node)


def _align(train: fx.Graph, evaluation: fx.Graph) -> tuple[dict[fx.Node, fx.Node], list[FlagSite]]:
    """Pair each eval node with the train node that computes the same: the same call, in the same
    module, in the same order (difflib's longest matching runs), on paired inputs, mode flags
    aside; return the pairs (eval node -> train node) and the mode flags."""
    train_nodes = [n for n in train.nodes if n.op != "output"]
    eval_nodes = [n for n in evaluation.nodes if n.op != "output"]
    runs = difflib.SequenceMatcher(None, list(map(_key, train_nodes)), list(map(_key, eval_nodes)), autojunk=False)
    pairs: dict[fx.Node, fx.Node] = {}
    flags: list[FlagSite] = []
    for run in runs.get_matching_blocks():
        for t, e in zip(train_nodes[run.a : run.a + run.size], eval_nodes[run.b : run.b + run.size], strict=True):
            found = _flags(t, e, pairs)
            if found is not None:
                pairs[e] = t
                flags += found
    return pairs, flags


def _unpaired(train: fx.Graph, evaluation: fx.Graph, pairs: dict[fx.Node, fx.Node]) -> list[fx.Node]:
    """The first node of each graph left unpaired, or the outputs if only they differ (empty: the
    graphs are the same, mode flags aside)."""
    paired = set(pairs.values())
    first = [
        next((n for n in graph.nodes if n.op != "output" and n not in done), None)
        for graph, done in ((train, paired), (evaluation, pairs))
    ]
    outputs = [train.output_node(), evaluation.output_node()]
    if not _same(outputs[0].args, outputs[1].args, pairs):
        first += outputs
    return [n for n in first if n is not None]


def _owned(graph: fx.Graph, module: str) -> list[tuple[str, str]]:
    return [(n.op, str(n.target)) for n in graph.nodes if module in _stack(n)]


def _mode_culprit(
    train: fx.Graph, evaluation: fx.Graph, called: set[str], diverging: list[fx.Node], skip: dict[str, str]
) -> str:
    """The innermost module, not in `skip`, that both modes call and whose own nodes differ
    between the two graphs ("" for the root: a module one mode does not call differs in its caller)."""
    candidates = [m for node in diverging for m in _stack(node) if m not in skip and m in called]
    for module in candidates:
        if _owned(train, module) != _owned(evaluation, module):
            return module
    return ""


@contextmanager
def buffers_restored(model: nn.Module) -> Iterator[list[str]]:
    """Put every buffer of `model` back as it was before the block (batch-norm's own update of its
    running statistics leaves no trace in the version counter, so all are restored); the list
    yielded gets, on exit, the names of those an in-place tensor op wrote (version changed)."""
    before = {name: (b, b._version, b.clone()) for name, b in model.named_buffers()}
    changed: list[str] = []
    try:
        yield changed
    finally:
        with torch.no_grad():
            for name, (buffer, version, value) in before.items():
                if buffer._version != version:
                    changed.append(name)
                buffer.copy_(value)


def _updated_in_place(buffers: Sequence[str]) -> dict[str, str]:
    """The sub-modules owning buffers a trace changed (an in-place update that the graph cannot
    repeat, such as BatchNormAct2d's `num_batches_tracked.add_(1)`), each with the reason."""
    owners: dict[str, str] = {}
    for name in buffers:
        owner, _, attr = name.rpartition(".")
        owners.setdefault(owner, f"updates its buffer '{attr}' in place, which a traced graph would not repeat")
    return owners


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


def trace(
    model: nn.Module, leaf_modules: Sequence[str] = (), *, freeze_batch_norm: bool = False, strict: bool = False
) -> fx.GraphModule:
    """Trace `model` into a GraphModule that follows `.train()` / `.eval()` like the model does.

    Untraceable and mode-dependent sub-modules become opaque leaves, listed with their reasons in
    `gm.meta["opaque_modules"]`; with strict=True an untraceable sub-module raises FactoTraceError
    instead. The root's own forward must trace (FactoTraceError otherwise); where it computes
    differently in train and eval mode, the graph holds both modes (passes/mode_graph.py).
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
            with buffers_restored(model) as changed, _counters_hidden(counted):
                with modes(model, True, freeze_batch_norm):
                    train, in_train = _trace_once(model, list(opaque))
                with modes(model, False, freeze_batch_norm):
                    evaluation, in_eval = _trace_once(model, list(opaque))
        except _Untraceable as failure:
            if strict or not failure.module or failure.module in opaque:
                raise _trace_error(model, failure, strict) from failure.error
            error = failure.error
            opaque[failure.module] = (
                f"torch.fx cannot trace it ({type(error).__name__}: {str(error).splitlines()[0][:160]} "
                f"at {_user_frame(error)}); kept as one call"
            )
            continue
        mutated = _updated_in_place(changed)
        if mutated:
            if "" in mutated or set(mutated) <= set(opaque):
                raise FactoTraceError(
                    f"{type(model).__name__}.forward updates buffers in place ({mutated}), which a traced graph "
                    "would not repeat\n  fix: move that update into the forward of the module that owns the buffer"
                )
            opaque.update({k: f"{v}{_why_counted(model.get_submodule(k))}; kept as one call"
                           for k, v in mutated.items() if k not in opaque})
            continue
        pairs, flags = _align(train, evaluation)
        diverging = _unpaired(train, evaluation, pairs)
        owner = _mode_culprit(train, evaluation, in_train & in_eval, diverging, opaque) if diverging else ""
        if not owner:
            break
        opaque[owner] = "computes differently in train and eval mode; kept as one call so its mode is read at run time"
    if diverging:
        merge_modes(train, evaluation, pairs)
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
