"""What torch.compile keeps for backward: the extra outputs of AOTAutograd's forward graph.

Compiled training does not go through saved_tensors_hooks; the saved values are instead the inputs
of the backward graph that the partitioner cut off (everything but the tangents). This runs dynamo
and AOTAutograd with inductor's decompositions and partitioner, but no code generation, and sums
those values' bytes, parameters and buffers excluded — the figures docs/design.md §5 quotes
(torchvision vgg11, batch 2: 37.6 MiB; activation_memory_budget 0.5: 13.7 MiB).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch._inductor.lowering  # noqa: F401  (the inductor partitioner looks up its lowerings)
from functorch.compile import make_boxed_func
from torch import Tensor, fx, nn
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.decomposition import select_decomp_table


@dataclass
class SavedValue:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


def _is_state(placeholder_name: str) -> bool:
    """Dynamo names lifted parameters and buffers after their module path: *_parameters_* / *_buffers_*."""
    return "_parameters_" in placeholder_name or "_buffers_" in placeholder_name


def compiled_saved_values(
    model: nn.Module, *inputs: Tensor, activation_memory_budget: float | None = None
) -> list[SavedValue]:
    """Tensors the compiled forward keeps for backward, for one call of `model(*inputs)`."""
    saved: list[SavedValue] = []

    def backend(gm: fx.GraphModule, example_inputs):
        is_state = [_is_state(n.name) for n in gm.graph.nodes if n.op == "placeholder"]

        def partition(joint, joint_inputs, **kwargs):
            fw, bw = min_cut_rematerialization_partition(joint, joint_inputs, compiler="inductor", **kwargs)
            for node in bw.graph.nodes:
                if node.op != "placeholder" or node.name.startswith("tangents"):
                    continue
                if node.name.startswith("primals_") and is_state[int(node.name.split("_")[1]) - 1]:
                    continue
                value = node.meta.get("val")
                if isinstance(value, Tensor):
                    nbytes = value.numel() * value.element_size()
                    saved.append(SavedValue(node.name, tuple(value.shape), value.dtype, nbytes))
            return fw, bw

        def boxed(graph, _example_inputs):
            return make_boxed_func(graph)

        return aot_autograd(
            fw_compiler=boxed, bw_compiler=boxed, partition_fn=partition, decompositions=select_decomp_table()
        )(gm, example_inputs)

    torch._dynamo.reset()
    patch = {} if activation_memory_budget is None else {"activation_memory_budget": activation_memory_budget}
    with torch._functorch.config.patch(patch), torch.enable_grad():
        torch.compile(model, backend=backend, fullgraph=True)(*inputs)
    torch._dynamo.reset()
    return saved


def compiled_saved_bytes(model: nn.Module, *inputs: Tensor, activation_memory_budget: float | None = None) -> int:
    """Total bytes of `compiled_saved_values`."""
    values = compiled_saved_values(model, *inputs, activation_memory_budget=activation_memory_budget)
    return sum(v.nbytes for v in values)
