"""The public verbs: compile, attach, report, export_dense."""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn
from torch._dynamo.eval_frame import OptimizedModule

from facto_fx.calibration import recalibrate_batch_norm, stale_statistics
from facto_fx.config import FactoConfig
from facto_fx.memory import peak_training_bytes, saved_tensors
from facto_fx.methods import Method, MethodConfig, method_handler, method_layers, method_notes
from facto_fx.passes.hooks import FactoHooks, attach
from facto_fx.passes.match import find_matches
from facto_fx.passes.rewrite import ModuleSite, rewrite, rewrite_regions
from facto_fx.passes.schedule import Decision, schedule
from facto_fx.passes.trace import OPAQUE_META, propagate_shapes, trace
from facto_fx.passes.verify import check_inputs
from facto_fx.passes.verify import example_inputs as verification_inputs
from facto_fx.passes.verify import verify as check
from facto_fx.report import MemoryReport, build_report
from facto_fx.triton_ops.dispatch import KernelScope

__all__ = [
    "FactoState", "FactoSavesLittleWarning", "attach", "compile", "decisions", "export_dense", "report", "FactoHooks",
]

# compile warns where the Facto model still saves more than this fraction of vanilla's bytes.
LITTLE_COMPRESSED = 0.9


class FactoSavesLittleWarning(UserWarning):
    """compile compressed less than a tenth of what the model saves for backward: training the Facto
    model costs about the memory of training the original (a transformer, an LSTM)."""


@dataclass
class FactoState:
    """What `compile` knows about a Facto model, kept in `fmodel.meta["facto"]`."""

    config: FactoConfig
    decisions: list[Decision]
    source: nn.Module
    region_notes: dict[str, str] = field(default_factory=dict)  # by the node running a region (row strips)


def compile(
    model: nn.Module,
    config: FactoConfig | None = None,
    *,
    example_inputs: tuple[Tensor, ...] | Tensor | None = None,
    verify: bool = True,
    calibration_data: Iterable | Tensor | None = None,
    **options,
) -> fx.GraphModule:
    """Trace `model` and rewrite it for Facto low-rank training with compressed feature maps.

    Pass a FactoConfig or its fields as keywords (inr=0.3, lossy_kernel=2, apply_ratio=0.6, ...).
    Before returning, the result is run against `model` on `example_inputs` (or on a small random
    batch shaped for the first layer) in eval mode: at M = 0 both must compute the same output, or
    FactoVerificationError names the first diverging node. verify=False skips that check. With
    `example_inputs`, every node also records its output shape and dtype in
    node.meta["tensor_meta"]; a single tensor is taken as the one input. The result shares
    parameters and buffers with `model`, not copies: its frozen weights W are the model's own, so
    merges update them in place (compile `copy.deepcopy(model)` to keep the original as it is).

    `calibration_data` (a few batches, a DataLoader; a single tensor is one batch) re-estimates
    `model`'s own batch-norm statistics, in place, on its current weights first
    (facto_fx.recalibrate_batch_norm): what frozen statistics (batch_norm="freeze") train on, and
    what eval uses in every mode. They are the Facto model's statistics too, shared like the
    weights. Without it, statistics about to be frozen that were never estimated get a warning
    naming them.

    Where less than a tenth of what the model saves for backward is compressed (layers no method
    covers: attention, recurrent layers), FactoSavesLittleWarning names the largest layers left as
    they are and why. It is measured on `example_inputs` or the verification batch (on meta
    tensors, as report(..., analytic=True)); with verify=False and no `example_inputs` there is no
    input to measure on, and no warning.
    """
    if config is not None and not isinstance(config, FactoConfig):
        raise TypeError(
            f"config must be a FactoConfig, got {type(config).__name__} ({config!r}): pass options as keywords, "
            "e.g. compile(model, inr=0.3), or compile(model, FactoConfig(inr=0.3))"
        )
    if config is not None and options:
        raise ValueError("pass either a FactoConfig or keyword options, not both")
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    config = config or FactoConfig(**options)
    if isinstance(model, fx.GraphModule) and "facto" in model.meta:
        raise ValueError("this model is already a Facto model; compile the original model instead")
    if verify and any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise ValueError("a model on the meta device cannot be verified: pass verify=False (nothing can run on it)")
    _prepare_statistics(model, calibration_data, frozen=config.batch_norm == "freeze")
    gm = _trace(model, config)
    if example_inputs is not None:
        check_inputs(gm, example_inputs, "example_inputs")
    inputs = example_inputs
    if verify and inputs is None:
        inputs = verification_inputs(model, gm)  # read from the plain trace's first layer
    matches = find_matches(gm)
    plan = schedule(gm, matches, config)
    rewrite(gm, matches, plan, ModuleSite(gm, config.seed))
    regions = [config.row_strips] if config.row_strips is not None else []
    notes = rewrite_regions(gm, plan, regions) if regions else {}
    gm.meta["facto"] = FactoState(config, plan, model, notes)
    if config.kernels != "auto":
        KernelScope(config.kernels).attach(gm)
    if verify:
        frozen = config.batch_norm == "freeze"
        check(model, gm, inputs, plan, lambda: _trace(model, config, gm), freeze_batch_norm=frozen)
    if inputs is not None:
        _warn_if_little_compressed(gm, inputs)
    if example_inputs is not None:
        propagate_shapes(gm, *example_inputs)
    return gm


def _trace(model: nn.Module, config: FactoConfig, like: fx.GraphModule | None = None) -> fx.GraphModule:
    """The pass's trace of `model`; `like` reuses the leaves an earlier trace chose, to skip retries."""
    leaves = list(like.meta[OPAQUE_META]) if like is not None else config.leaf_modules
    return trace(model, leaves, freeze_batch_norm=config.batch_norm == "freeze", strict=config.strict)


def _prepare_statistics(model: nn.Module, calibration_data: Iterable | None, frozen: bool) -> None:
    """Re-estimate the statistics on the current weights, or warn where statistics about to be
    frozen look stale."""
    if calibration_data is not None:
        device = next((t.device for t in [*model.parameters(), *model.buffers()]), None)
        recalibrate_batch_norm(model, calibration_data, device=device)
        return
    if not frozen or any(t.is_meta for t in model.buffers()):
        return
    stale = stale_statistics(model)
    if stale:
        shown = ", ".join(stale[:3]) + (f" and {len(stale) - 3} more" if len(stale) > 3 else "")
        warnings.warn(
            f"compile freezes batch-norm statistics that were never estimated ({shown}: mean 0, variance 1): "
            "pass calibration_data=<a few training batches> or call facto_fx.recalibrate_batch_norm(model, "
            "batches) first, or batch_norm='lossy' to train on batch statistics",
            stacklevel=3,
        )


def _warn_if_little_compressed(fmodel: fx.GraphModule, inputs: tuple[Tensor, ...]) -> None:
    """FactoSavesLittleWarning where the Facto model saves more than LITTLE_COMPRESSED of vanilla's
    bytes, naming the largest layers left as they are and why (their decisions' reasons)."""
    try:
        table = report(fmodel, *inputs, analytic=True)
    except RuntimeError:  # code that reads values (an opaque module's data-dependent branch) cannot run on meta
        if any(x.is_meta for x in inputs):
            return  # no values to run it on either
        with torch.random.fork_rng(devices=[x.device for x in inputs if x.is_cuda]):  # dropout draws
            table = report(fmodel, *inputs)
    if not table.vanilla_bytes or table.facto_bytes <= LITTLE_COMPRESSED * table.vanilla_bytes:
        return
    state = _state(fmodel)
    by_layer = {d.layer: d for d in state.decisions}
    kept = sorted((r for r in table.rows if r.facto_bytes >= r.vanilla_bytes > 0), key=lambda r: -r.vanilla_bytes)
    causes: dict[str, str] = {}  # the layers that keep those maps whole, largest map first
    for r in kept:
        for layer in r.kept_for:
            d = by_layer.get(layer)
            if layer not in causes and (d is None or not d.compress):
                share = 100 * r.vanilla_bytes / table.vanilla_bytes
                kind, reason = (d.kind, d.reason) if d else (r.op, "an operation no method rewrites")
                causes[layer] = f"'{layer}' ({kind}, {share:.0f} %): {reason}"
    largest = "; ".join(list(causes.values())[:3])
    shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
    warnings.warn(
        f"facto_fx.compile compresses little of what {type(state.source).__name__} saves for backward: "
        f"the Facto model saves {100 * table.ratio:.1f} % of vanilla's bytes on an input of shape {shapes}, so "
        f"training it takes about the memory of training the original. Largest left as they are: {largest}. "
        "The pass compresses conv2d, linear, batch-norm, ReLU and other activations, max-pool and dropout layers; "
        "facto_fx.report(fmodel, x) lists every layer and why",
        FactoSavesLittleWarning,
        stacklevel=3,
    )


def facto_model(model: nn.Module) -> fx.GraphModule:
    """The Facto GraphModule behind `model`: itself, or the model a `torch.compile` wrapper holds.

    A model the "facto" torch.compile backend rewrote has no graph of its own to report on: the
    error says what to pass instead.
    """
    inner = model._orig_mod if isinstance(model, OptimizedModule) else model
    if isinstance(inner, fx.GraphModule) and "facto" in inner.meta:
        return inner
    if method_layers(inner):
        raise ValueError(
            "this model was rewritten by the 'facto' torch.compile backend, whose graphs dynamo keeps: report, "
            "export_dense and inspect need facto_fx.compile(model) (torch.compile the result as usual); "
            "attach and low_rank_parameters work on it as it is"
        )
    raise ValueError("expected a model returned by facto_fx.compile (or torch.compile of one)")


def _state(fmodel: nn.Module) -> FactoState:
    return facto_model(fmodel).meta["facto"]


def decisions(fmodel: fx.GraphModule) -> list[Decision]:
    """The scheduler's decision and reason for every layer the pass considered."""
    return list(_state(fmodel).decisions)


def report(
    fmodel: fx.GraphModule, *example_inputs: Tensor, analytic: bool = False, peak: bool = False
) -> MemoryReport:
    """Per-layer saved bytes for one forward pass, vanilla (eager, all weights trained) vs Facto.

    analytic=True computes the same figures on meta tensors, allocating nothing. peak=True also
    measures the peak memory of one forward + backward of each (what decides whether a batch
    fits); it needs real tensors.
    """
    if peak and analytic:
        raise ValueError("peak=True measures real allocations; it cannot be combined with analytic=True")
    fmodel = facto_model(fmodel)
    state = _state(fmodel)
    vanilla_gm = _trace(state.source, state.config, fmodel)
    check_inputs(vanilla_gm, example_inputs, "input")
    inputs: dict[str, int] = {}
    vanilla = saved_tensors(vanilla_gm, example_inputs, analytic=analytic, train_all=True, input_bytes=inputs)
    nodes = {node.name: node for node in fmodel.graph.nodes} if analytic else {}
    estimates = {
        d.node: functools.partial(method_handler(d.method).saved_bytes, d.method, nodes[d.node])
        for d in state.decisions if d.rewritten and d.node in nodes
    }
    facto = saved_tensors(fmodel, example_inputs, analytic=analytic, estimates=estimates)
    result = build_report(state.decisions, vanilla_gm, vanilla, facto, inputs, state.region_notes)
    result.notes = {**_notes(fmodel, example_inputs, analytic), **state.region_notes}
    if peak:
        result.vanilla_peak = peak_training_bytes(vanilla_gm, example_inputs, train_all=True)
        result.facto_peak = peak_training_bytes(fmodel, example_inputs)
    return result


def graph_nodes(fmodel: fx.GraphModule) -> list[tuple[fx.Node, str | None]]:
    """Every node to show, each with the region that runs it: a region's own graph (row strips'
    chain of layers) is listed right after the node that runs it."""
    found = []
    for node in fmodel.graph.nodes:
        if node.op == "output":
            continue
        found.append((node, None))
        chain = getattr(fmodel.get_submodule(node.target), "chain", None) if node.op == "call_module" else None
        if isinstance(chain, fx.GraphModule):
            found += [(n, node.name) for n in chain.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    return found


def _method_nodes(fmodel: fx.GraphModule) -> list[tuple[Decision, MethodConfig, fx.Node, Method]]:
    """Every rewritten node with each method its decision applied (the method, then a wrapper),
    those a region runs (row strips) included."""
    nodes = {node.name: node for node, _ in graph_nodes(fmodel)}
    return [(d, m, nodes[d.node], method_handler(m))
            for d in _state(fmodel).decisions if d.rewritten and d.node in nodes for m in d.methods]


def _notes(fmodel: fx.GraphModule, inputs: tuple, analytic: bool) -> dict[str, str]:
    """Per-layer notes: on real data what each method kept (HOSVD's ranks, ErrorBounded's eb and
    ratio, from the report's own run); analytic, what its figure stands for."""
    if analytic:
        return {d.layer: note for d, _, _, handler in _method_nodes(fmodel) if (note := handler.analytic_note)}
    notes = method_notes(fmodel, inputs)
    for d, _, node, handler in _method_nodes(fmodel):
        if note := handler.node_note(node):
            notes[d.layer] = note
    return notes


def method_summaries(fmodel: fx.GraphModule) -> list[str]:
    """One line per method on what its layers kept in the last training call (the training log's)."""
    by_handler: dict[int, tuple[Method, list[fx.Node]]] = {}
    for _, _, node, handler in _method_nodes(facto_model(fmodel)):
        by_handler.setdefault(id(handler), (handler, []))[1].append(node)
    return [line for handler, group in by_handler.values() if (line := handler.summarize(group))]


def _state_keys(fmodel: fx.GraphModule) -> dict[str, tuple[fx.Node, Method]]:
    return {f"{d.node}/{type(m).__name__}": (node, handler) for d, m, node, handler in _method_nodes(fmodel)}


def method_state(fmodel: fx.GraphModule) -> dict[str, dict]:
    """The state rewritten nodes keep outside the model's state_dict (ErrorBounded's adaptive
    bounds), by node: save it beside the state_dict to resume a run exactly."""
    keys = _state_keys(facto_model(fmodel))
    return {key: state for key, (node, handler) in keys.items() if (state := handler.node_state(node))}


def load_method_state(fmodel: fx.GraphModule, state: dict[str, dict]) -> None:
    """Inverse of `method_state`, on a model compiled the same way."""
    keys = _state_keys(facto_model(fmodel))
    unknown = sorted(set(state) - set(keys))
    if unknown:
        raise ValueError(f"method state for nodes this model does not have: {unknown[:3]}; compiled another way?")
    for key, value in state.items():
        node, handler = keys[key]
        handler.load_node_state(node, value)


@torch.no_grad()
def export_dense(fmodel: fx.GraphModule) -> nn.Module:
    """A fresh copy of the original model with every method's layer turned back into dense
    tensors (Facto: W + M·D merged).

    Its state_dict has the original model's keys, so it loads into a new instance strictly; its
    tensors take the Facto model's current values, dtypes and devices.
    """
    fmodel = facto_model(fmodel)
    state = _state(fmodel)
    current = fmodel.state_dict()
    for name, layer, handler in method_layers(fmodel):
        current.update({f"{name}.{key}": value for key, value in handler.dense_state(layer).items()})
    dense = copy.deepcopy(state.source)
    wanted = dense.state_dict()
    dense.load_state_dict({k: current[k].clone() if k in current else v for k, v in wanted.items()}, assign=True)
    for param in dense.parameters():
        param.requires_grad_(True)
    return dense
