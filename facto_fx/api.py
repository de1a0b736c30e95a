"""The public verbs: compile, attach, report, export_dense."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from facto_fx.config import FactoConfig
from facto_fx.layers import LOW_RANK_LAYERS
from facto_fx.memory import saved_bytes_by_node
from facto_fx.passes.hooks import FactoHooks, attach
from facto_fx.passes.match import find_matches
from facto_fx.passes.rewrite import rewrite
from facto_fx.passes.schedule import Decision, schedule
from facto_fx.passes.trace import propagate_shapes, trace
from facto_fx.report import MemoryReport, build_report
from facto_fx.triton_ops.dispatch import KernelScope

__all__ = ["FactoState", "attach", "compile", "decisions", "export_dense", "report", "FactoHooks"]


@dataclass
class FactoState:
    """What `compile` knows about a Facto model, kept in `fmodel.meta["facto"]`."""

    config: FactoConfig
    decisions: list[Decision]
    source: nn.Module


def compile(
    model: nn.Module,
    config: FactoConfig | None = None,
    *,
    example_inputs: tuple[Tensor, ...] | None = None,
    **options,
) -> fx.GraphModule:
    """Trace `model` and rewrite it for Facto low-rank training with compressed feature maps.

    Pass a FactoConfig or its fields as keywords (inr=0.3, lossy_kernel=2, apply_ratio=0.6, ...).
    With `example_inputs`, every node of the result records its output shape and dtype in
    node.meta["tensor_meta"]. The result shares parameters with `model`: its frozen weights W are
    the model's own, so merges update them in place.
    """
    if config is not None and options:
        raise ValueError("pass either a FactoConfig or keyword options, not both")
    config = config or FactoConfig(**options)
    if isinstance(model, fx.GraphModule) and "facto" in model.meta:
        raise ValueError("this model is already a Facto model; compile the original model instead")
    gm = trace(model, config.leaf_modules)
    matches = find_matches(gm)
    plan = schedule(gm, matches, config)
    rewrite(gm, matches, plan, config)
    gm.meta["facto"] = FactoState(config, plan, model)
    if config.kernels != "auto":
        KernelScope(config.kernels).attach(gm)
    if example_inputs is not None:
        propagate_shapes(gm, *example_inputs)
    return gm


def _state(fmodel: nn.Module) -> FactoState:
    state = getattr(fmodel, "meta", {}).get("facto") if isinstance(fmodel, fx.GraphModule) else None
    if state is None:
        raise ValueError("expected a model returned by facto_fx.compile")
    return state


def decisions(fmodel: fx.GraphModule) -> list[Decision]:
    """The scheduler's decision and reason for every layer the pass considered."""
    return list(_state(fmodel).decisions)


def report(fmodel: fx.GraphModule, *example_inputs: Tensor, analytic: bool = False) -> MemoryReport:
    """Per-layer saved bytes for one forward pass, vanilla (eager, all weights trained) vs Facto.

    analytic=True computes the same figures on meta tensors, allocating nothing.
    """
    state = _state(fmodel)
    vanilla_gm = trace(state.source, state.config.leaf_modules)
    vanilla = saved_bytes_by_node(vanilla_gm, example_inputs, analytic=analytic, train_all=True)
    facto = saved_bytes_by_node(fmodel, example_inputs, analytic=analytic)
    return build_report(state.decisions, vanilla_gm, vanilla, facto)


@torch.no_grad()
def export_dense(fmodel: fx.GraphModule) -> nn.Module:
    """A fresh copy of the original model with every low-rank layer merged (W + M·D).

    Its state_dict has the original model's keys, so it loads into a new instance strictly; its
    tensors take the Facto model's current values, dtypes and devices.
    """
    state = _state(fmodel)
    current = fmodel.state_dict()
    for name, layer in fmodel.named_modules():
        if isinstance(layer, LOW_RANK_LAYERS):
            current[f"{name}.weight"] = layer.merged_weight()
    dense = copy.deepcopy(state.source)
    wanted = dense.state_dict()
    dense.load_state_dict({k: current[k].clone() if k in current else v for k, v in wanted.items()}, assign=True)
    for param in dense.parameters():
        param.requires_grad_(True)
    return dense
