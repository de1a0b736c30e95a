"""Row-centric strips (LR-CNN, docs/design.md §4b): the chain of spatially local layers from the
input runs one horizontal strip at a time, so a strip's intermediate maps die before the next
strip starts. Lossless; it lowers a step's peak memory, not what each layer saves.
"""

from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch.nn.functional as F
from torch import fx

from facto_fx.layers import FactoBatchNorm
from facto_fx.methods.base import Method, MethodConfig, module_tensors, register_method
from facto_fx.ops.row_strips import RowStripRegion
from facto_fx.passes.regions import BATCH_STATISTICS_STOP, find_region

MODES = ("two_phase", "overlap")


@dataclass(frozen=True)
class RowStrips(MethodConfig):
    """Run the local chain from the input in `strips` horizontal strips.

    mode: "two_phase" (strips in order, each handing the next the rows it shares instead of
        recomputing them) or "overlap" (strips independent, halo rows recomputed).
    max_overhead: a segment of the chain ends where overlap strips would compute more than this
        share of its maps twice (two_phase uses the same segments: the same halos are its skew);
        from the first point no segment is that cheap (small maps), the rest runs whole.
    The defaults measured best in benchmarks/row_strips.py (vgg16 and resnet50, batch 8, 224²):
    8 strips lower the peak well below 4 strips' at the same step time, and two_phase is faster
    than overlap (no recomputed halos) for a peak a few percent higher.
    """

    label: ClassVar[str] = "rowstrips"

    strips: int = 8
    mode: Literal["overlap", "two_phase"] = "two_phase"
    max_overhead: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.strips, bool) or not isinstance(self.strips, int) or self.strips < 2:
            raise ValueError(f"RowStrips(strips=...) must be an integer >= 2; got {self.strips!r}")
        if self.mode not in MODES:
            raise ValueError(f"RowStrips(mode=...) must be one of {MODES}; got {self.mode!r}")
        if isinstance(self.max_overhead, bool) or not isinstance(self.max_overhead, (int, float)) or not (
            self.max_overhead > 0
        ):
            raise ValueError(f"RowStrips(max_overhead=...) must be a number > 0; got {self.max_overhead!r}")


def _chain_module(gm: fx.GraphModule, nodes: list[fx.Node], source: fx.Node) -> fx.GraphModule:
    """A GraphModule computing `nodes` from `source`, sharing `gm`'s modules and parameters."""
    graph = fx.Graph()
    env = {source: graph.placeholder(source.name)}

    def copied(a: fx.Node) -> fx.Node:
        if a not in env:  # a get_attr the chain reads
            env[a] = graph.node_copy(a, copied)
        return env[a]

    for node in nodes:
        env[node] = graph.node_copy(node, copied)
    graph.output(env[nodes[-1]])
    chain = fx.GraphModule(gm, graph)
    _share_attribute_owners(gm, chain)
    _out_of_place(chain)
    _plain_batch_norm(chain)
    return chain


_MODEL = "_facto_model"  # the chain's name for the model, owner of the tensors it holds itself


def _share_attribute_owners(gm: fx.GraphModule, chain: fx.GraphModule) -> None:
    """Tensors the chain reads as attributes are looked up on the model's own modules at every
    run, as the model does: fx copies them into modules of the chain's, which `.to()`, `.half()`
    or `load_state_dict(assign=True)` on the model would leave holding the old tensors."""
    for node in chain.graph.nodes:
        if node.op != "get_attr":
            continue
        owner, _, name = node.target.rpartition(".")
        if owner:
            chain.set_submodule(owner, gm.get_submodule(owner))
        else:
            chain.add_module(_MODEL, gm)
            node.target = f"{_MODEL}.{name}"
    chain.recompile()


def _plain_batch_norm(chain: fx.GraphModule) -> None:
    """Frozen batch-norm that keeps its input whole computes and saves what torch's eval-mode
    batch-norm does: run torch's (fused, cheaper) in the chain."""
    for node in list(chain.graph.nodes):
        module = chain.get_submodule(node.target) if node.op == "call_module" else None
        if not (isinstance(module, FactoBatchNorm) and not module.batch_statistics and module.lossy_kernel == 1
                and module.storage_dtype is None and module.bits is None):
            continue
        tensors = module_tensors(chain.graph, node, module, ("running_mean", "running_var", "weight", "bias"))
        node.op, node.target = "call_function", F.batch_norm
        node.args = (node.args[0], *tensors, False, 0.0, module.eps)
    chain.graph.lint()


_IN_PLACE_FUNCTIONS = {operator.iadd: operator.add, operator.imul: operator.mul, operator.isub: operator.sub}


def _out_of_place(chain: fx.GraphModule) -> None:
    """Make the chain's in-place ops out-of-place (same values): a strip's ops read slices of maps
    other strips read too, which an in-place op would overwrite. The model's own modules are left
    as they are (the copies hang from the chain's root, not from modules it shares with the model);
    the chain gets copies of the activations it changes."""
    for node in chain.graph.nodes:
        if node.op == "call_module":
            module = chain.get_submodule(node.target)
            if getattr(module, "inplace", False) is True and not list(module.parameters(recurse=True)):
                replacement = copy.copy(module)
                replacement.inplace = False
                node.target = f"{node.name}_out_of_place"
                chain.add_module(node.target, replacement)
        elif node.op == "call_function":
            node.target = _IN_PLACE_FUNCTIONS.get(node.target, node.target)
            if node.kwargs.get("inplace") is True:
                node.kwargs = {**node.kwargs, "inplace": False}
        elif node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_"):
            node.target = node.target[:-1]
    chain.recompile()


@register_method(RowStrips)
class RowStripsMethod(Method):
    compiles = False
    modules = (RowStripRegion,)

    def rewrite_region(self, gm: fx.GraphModule, method: RowStrips) -> tuple[list[str], str | None, str]:
        region = find_region(gm)
        stop = region if isinstance(region, str) else region.stop
        if BATCH_STATISTICS_STOP in stop:
            warnings.warn(f"row strips end at a batch-norm: {stop}", stacklevel=2)
        if isinstance(region, str):
            return [], None, f"nothing to split: {region}"
        chain = _chain_module(gm, region.nodes, region.input)
        layer = RowStripRegion(chain, {n.name: g for n, g in region.geometry.items()},
                               [c.name for c in region.cuts], method.strips, method.mode, method.max_overhead)
        name = "row_strips"
        gm.add_submodule(name, layer)
        end = region.output
        with gm.graph.inserting_after(end):
            call = gm.graph.call_module(name, (region.input,))
        end.replace_all_uses_with(call)
        for node in reversed(region.nodes):
            gm.graph.erase_node(node)
        for node in list(gm.graph.nodes):
            if node.op == "get_attr" and not node.users:
                gm.graph.erase_node(node)
        first, last = region.nodes[0].name, end.name
        note = (f"{len(region.nodes)} nodes from {first} to {last} run in {method.strips} strips ({method.mode}); "
                f"the chain ends at {region.stop}. Saved bytes count only the steps it runs whole (strip inputs "
                "are held outside autograd's hooks): judge it by the peak, report(..., peak=True)")
        return [n.name for n in region.nodes], name, note
