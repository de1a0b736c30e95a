"""The guard: a rewritten model must compute what the original computes while M = 0.

Right after `compile`, every M is zero, so a Facto model with frozen statistics computes exactly
the original model in eval mode, up to float rounding. `verify` runs both on one small batch (with
gradients on, so the Facto operators take their training path) and refuses a mismatch, naming the
first node whose value diverges and the layer to exclude.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, fx, nn
from torch.utils import _pytree as pytree

from facto_fx.passes.match import WEIGHTED_FUNCTIONS, call_args
from facto_fx.passes.rewrite import MOVED
from facto_fx.passes.schedule import Decision
from facto_fx.passes.trace import modes

# Largest relative error (max |facto - original| / max |original|) accepted per output dtype.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
EXAMPLE_SIZES = (64, 32, 224, 28, 16, 8, 96, 299)  # spatial sizes tried, in order, for an image input


class FactoVerificationError(RuntimeError):
    """The rewritten model does not compute what the original computes; nothing is returned."""


def _first_layer(gm: fx.GraphModule) -> tuple[Tensor, bool] | None:
    """The weight of the first conv / linear in graph order, and whether it is a conv."""
    for node in gm.graph.nodes:
        weight = None
        if node.op == "call_module":
            weight = getattr(gm.get_submodule(node.target), "weight", None)
        elif node.op == "call_function" and node.target in WEIGHTED_FUNCTIONS:
            source = call_args(node)["weight"]
            if isinstance(source, fx.Node) and source.op == "get_attr":
                weight = gm.get_parameter(source.target)
        if isinstance(weight, Tensor) and weight.dim() in (2, 4):
            return weight, weight.dim() == 4
    return None


def example_inputs(model: nn.Module, gm: fx.GraphModule) -> tuple[Tensor, ...]:
    """A batch of 2 random inputs the model accepts, shaped for its first conv or linear layer.

    Drawn from a private generator, so the global random state is left as it was.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    first = _first_layer(gm)
    if len(placeholders) != 1 or first is None:
        why = f"it takes {len(placeholders)} inputs" if len(placeholders) != 1 else "it has no conv or linear layer"
        raise FactoVerificationError(
            f"cannot build an example input for {type(model).__name__} ({why}); "
            "pass example_inputs=(...) to facto_fx.compile"
        )
    weight, is_conv = first
    shapes = [(2, weight.shape[1], s, s) for s in EXAMPLE_SIZES] if is_conv else [(2, weight.shape[1])]
    generator = torch.Generator().manual_seed(0)
    failures = []
    for shape in shapes:
        x = torch.randn(shape, generator=generator).to(device=weight.device, dtype=weight.dtype)
        try:
            with torch.no_grad(), modes(model, False):
                model(x)
        except Exception as error:  # the model rejects this size: try the next
            failures.append(f"{tuple(shape)}: {type(error).__name__}")
            continue
        return (x,)
    raise FactoVerificationError(
        f"cannot build an example input for {type(model).__name__} (tried {failures}); "
        "pass example_inputs=(...) to facto_fx.compile"
    )


def relative_error(value: Tensor, reference: Tensor) -> float:
    """max |value - reference| / max |reference|, with NaN and inf required in the same places."""
    if value.shape != reference.shape:
        return float("inf")
    if not reference.is_floating_point():
        return 0.0 if torch.equal(value, reference) else float("inf")
    value, reference = value.double(), reference.double()
    finite = torch.isfinite(reference)
    if not torch.equal(finite, torch.isfinite(value)):
        return float("inf")
    if not torch.equal(value[~finite].nan_to_num(), reference[~finite].nan_to_num()):
        return float("inf")
    scale = reference[finite].abs().max().item() if finite.any() else 0.0
    difference = (value[finite] - reference[finite]).abs().max().item() if finite.any() else 0.0
    return difference / scale if scale > 0 else difference


def _tensors(output: object) -> list[Tensor]:
    return [t.detach() for t in pytree.tree_leaves(output) if isinstance(t, Tensor)]


def _worst(values: Sequence[Tensor], references: Sequence[Tensor]) -> float:
    if len(values) != len(references):
        return float("inf")
    return max((relative_error(v, r) for v, r in zip(values, references, strict=True)), default=0.0)


def _tolerance(references: Sequence[Tensor]) -> float:
    return max((TOLERANCE.get(t.dtype, 0.0) for t in references), default=0.0)


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps every node's value."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)

    def values(self, *inputs: Tensor) -> dict[str, list[Tensor]]:
        self.run(*inputs)
        return {node.name: _tensors(value) for node, value in self.env.items()}


def _first_divergence(
    reference: fx.GraphModule, fmodel: fx.GraphModule, inputs: Sequence[Tensor]
) -> tuple[fx.Node, float] | None:
    """The first node of `fmodel` whose value differs from the same-named node of the original."""
    with torch.no_grad():
        expected = _Recorder(reference).values(*inputs)
    with torch.enable_grad():
        actual = _Recorder(fmodel).values(*inputs)
    for node in fmodel.graph.nodes:
        if node.meta.get(MOVED) or node.name not in expected or not expected[node.name]:
            continue
        error = _worst(actual[node.name], expected[node.name])
        if error > _tolerance(expected[node.name]):
            return node, error
    return None


def verify(
    model: nn.Module,
    fmodel: fx.GraphModule,
    inputs: Sequence[Tensor],
    decisions: Sequence[Decision],
    reference: Callable[[], fx.GraphModule],
) -> float:
    """Check that `fmodel` computes `model`'s output on `inputs` in eval mode; return the error.

    `reference` builds the plain trace of `model` (node names shared with `fmodel`), used only to
    find the first diverging node when the outputs disagree.
    """
    with modes(model, False), modes(fmodel, False):
        with torch.no_grad():
            expected = _tensors(model(*inputs))
        with torch.enable_grad():
            actual = _tensors(fmodel(*inputs))
        error = _worst(actual, expected)
        limit = _tolerance(expected)
        if error <= limit:
            return error
        divergence = _first_divergence(reference(), fmodel, inputs)
    raise FactoVerificationError(_message(model, error, limit, divergence, decisions))


def _message(
    model: nn.Module,
    error: float,
    limit: float,
    divergence: tuple[fx.Node, float] | None,
    decisions: Sequence[Decision],
) -> str:
    lines = [
        f"facto_fx.compile would change what {type(model).__name__} computes: with M = 0 and statistics "
        f"frozen its output differs from the original's by {error:.3g} (relative; at most {limit:g} is float "
        "rounding). Nothing was returned."
    ]
    if divergence is None:
        lines.append("  no single node diverges beyond rounding: the error builds up along the graph")
        lines.append("  fix: pass exclude=[...] for the layers you suspect, or verify=False at your own risk")
        return "\n".join(lines)
    node, node_error = divergence
    decision = next((d for d in decisions if d.node == node.name), None)
    if decision is not None:
        lines.append(
            f"  first diverging node: '{node.name}', layer '{decision.layer}' ({decision.kind}, "
            f"{decision.reason}); relative error {node_error:.3g}"
        )
        lines.append(f"  fix: pass exclude=['{decision.layer}'] to leave that layer dense, and please report this")
    else:
        lines.append(f"  first diverging node: '{node.name}' ({node.format_node()}); relative error {node_error:.3g}")
        lines.append("  fix: please report this; verify=False skips the check at your own risk")
    return "\n".join(lines)
