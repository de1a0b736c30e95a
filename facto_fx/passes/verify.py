"""The guard: a rewritten model must compute what the original computes while M = 0.

Right after `compile`, every M is zero, so a Facto model with frozen statistics computes exactly
the original model in eval mode, up to float rounding. `verify` runs both on one small batch (with
gradients on, so the Facto operators take their training path) and refuses a mismatch, naming the
first node whose value diverges and the layer to exclude. A model whose train mode runs other
nodes than its eval mode (passes/mode_graph.py) is checked in train mode too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, fx, nn
from torch.utils import _pytree as pytree

from facto_fx.matches import call_args
from facto_fx.passes.match import WEIGHTED_FUNCTIONS, GraphTensors
from facto_fx.passes.mode_graph import two_modes
from facto_fx.passes.rewrite import MOVED
from facto_fx.passes.schedule import Decision
from facto_fx.passes.trace import buffers_restored, modes, owner_module

# Largest relative error (max |facto - original| / max |original|) accepted per output dtype.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
EXAMPLE_SIZES = (64, 32, 224, 28, 16, 8, 96, 299)  # spatial sizes tried, in order, for an image input


class FactoVerificationError(RuntimeError):
    """The rewritten model does not compute what the original computes; nothing is returned."""


def _seeded(run: Callable[..., object], inputs: Sequence[Tensor], grad: bool) -> object:
    """run(*inputs), with or without gradients, on the random draws of seed 0 (dropout,
    drop-path); the global random state is left as it was."""
    with torch.random.fork_rng(devices=[x.device for x in inputs if x.is_cuda]), torch.set_grad_enabled(grad):
        torch.manual_seed(0)
        return run(*inputs)


def checked_modes(gm: fx.GraphModule) -> tuple[bool, ...]:
    """The modes (training or not) the model must run in on the verification inputs: train mode
    too where it runs other nodes than eval mode."""
    return (False, True) if two_modes(gm.graph) else (False,)


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


def _declared_size(model: nn.Module) -> tuple[int, ...] | None:
    """The (C, H, W) input size the model says it takes: timm's `pretrained_cfg["input_size"]`
    (or `default_cfg`), which fits models whose first layer cannot be read or that take one size."""
    for name in ("pretrained_cfg", "default_cfg"):
        config = getattr(model, name, None)
        size = config.get("input_size") if isinstance(config, Mapping) else None
        if isinstance(size, (tuple, list)) and len(size) == 3:
            return tuple(size)
    return None


def example_inputs(model: nn.Module, gm: fx.GraphModule) -> tuple[Tensor, ...]:
    """A batch of 2 random inputs the model accepts: of the input size the model declares, if it
    does (`_declared_size`), else shaped for its first conv or linear layer.

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
    declared = _declared_size(model)
    if declared is not None:
        shapes.insert(0, (2, *declared))
    generator = torch.Generator().manual_seed(0)
    failures = []
    for shape in shapes:
        x = torch.randn(shape, generator=generator).to(device=weight.device, dtype=weight.dtype)
        try:
            for training in checked_modes(gm):
                with modes(model, training), buffers_restored(model):
                    _seeded(model, (x,), grad=False)
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
    reference: fx.GraphModule, fmodel: fx.GraphModule, inputs: Sequence[Tensor], training: bool, frozen: bool
) -> tuple[fx.Node, float] | None:
    """The first node of `fmodel` whose value differs from the same-named node of the original."""
    with modes(reference, training, frozen):
        expected = _seeded(_Recorder(reference).values, inputs, grad=False)
    actual = _seeded(_Recorder(fmodel).values, inputs, grad=not training)
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
    *,
    freeze_batch_norm: bool = False,
) -> float:
    """Check that `fmodel` computes `model`'s output on `inputs` in eval mode, and in train mode
    where the two modes run other nodes; return the largest error.

    In train mode both run without gradients (Facto's dropout, which saves its mask, draws it
    otherwise than F.dropout) on the same random draws, batch-norm in eval where compile froze it,
    and the buffers a training forward updates are restored. `reference` builds the plain trace of
    `model` (node names shared with `fmodel`), used only to find the first diverging node when the
    outputs disagree.
    """
    return max(
        _verify_mode(model, fmodel, inputs, decisions, reference, training, freeze_batch_norm)
        for training in checked_modes(fmodel)
    )


def _verify_mode(
    model: nn.Module,
    fmodel: fx.GraphModule,
    inputs: Sequence[Tensor],
    decisions: Sequence[Decision],
    reference: Callable[[], fx.GraphModule],
    training: bool,
    frozen: bool,
) -> float:
    with (
        modes(model, training, frozen), modes(fmodel, training, frozen),
        buffers_restored(model), buffers_restored(fmodel),
    ):
        try:
            expected = _tensors(_seeded(model, inputs, grad=False))
        except Exception as error:
            shapes = ", ".join(str(tuple(x.shape)) for x in inputs if isinstance(x, Tensor))
            raise FactoVerificationError(
                f"{type(model).__name__} itself fails in {'train' if training else 'eval'} mode on the verification "
                f"inputs ({shapes}): {type(error).__name__}: {error}\n  fix: pass example_inputs=(...) that it "
                "runs on (in train mode too where it runs other code there: an auxiliary head may need a larger image)"
            ) from error
        actual = _tensors(_seeded(fmodel, inputs, grad=not training))
        error = _worst(actual, expected)
        limit = _tolerance(expected)
        if error <= limit:
            return error
        divergence = _first_divergence(reference(), fmodel, inputs, training, frozen)
    raise FactoVerificationError(_message(model, error, limit, divergence, decisions, training))


def _message(
    model: nn.Module,
    error: float,
    limit: float,
    divergence: tuple[fx.Node, float] | None,
    decisions: Sequence[Decision],
    training: bool,
) -> str:
    lines = [
        f"facto_fx.compile would change what {type(model).__name__} computes: with M = 0 and statistics "
        f"frozen its {'train' if training else 'eval'}-mode output differs from the original's by {error:.3g} "
        f"(relative; at most {limit:g} is float rounding). Nothing was returned."
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


def _input_layer(gm: fx.GraphModule, node: fx.Node) -> tuple[str, bool, int] | None:
    """The conv or linear layer `node` is, if any: its name and type, whether it is a conv, and the
    size it expects in the input's channel (conv) or last (linear) dimension."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            conv = isinstance(module, nn.Conv2d)
            size = module.in_channels if conv else module.in_features
            return f"'{node.target}' ({type(module).__name__})", conv, size
    elif node.op == "call_function" and node.target in WEIGHTED_FUNCTIONS:
        args = call_args(node)
        weight = GraphTensors(gm).tensor(args["weight"])
        if weight is not None:
            conv = weight.dim() == 4
            size = weight.shape[1] * (args["groups"] if conv else 1)
            return f"'{owner_module(node) or args['weight'].target}' ({node.target.__name__})", conv, size
    return None


def _input_problem(x: Tensor, layer: str, conv: bool, size: int, argument: str) -> str | None:
    shape = tuple(x.shape)
    if conv and x.dim() == 3:
        return (f"{argument} of shape {shape} looks unbatched (C, H, W): layer {layer} takes a batch (N, C, H, W); "
                "add a batch dimension, e.g. x.unsqueeze(0)")
    if conv and x.dim() != 4:
        return f"layer {layer} expects a batch of images (N, C, H, W); got {argument} of shape {shape}"
    if x.dim() == 0 or x.shape[1 if conv else -1] == size:
        return None
    return f"layer {layer} expects {size} input {'channels' if conv else 'features'}; got {argument} of shape {shape}"


def check_inputs(gm: fx.GraphModule, inputs: Sequence[object], argument: str) -> None:
    """Refuse inputs that a conv or linear layer reading them directly cannot take, before anything
    runs: ValueError names the layer, the shape it expects and the fix. Torch would fail later and
    deeper (a 3-D batch passes a conv as one unbatched image and breaks the batch-norm after it;
    ShapeProp prints its own traceback first). `argument` names the inputs in the message."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for placeholder, x in zip(placeholders, inputs, strict=False):
        if not isinstance(x, Tensor):
            continue
        for user in placeholder.users:
            layer = _input_layer(gm, user)
            problem = _input_problem(x, *layer, argument) if layer is not None else None
            if problem is not None:
                raise ValueError(problem)
