"""The "facto" torch.compile backend: the pass on the graphs dynamo captures.

    compiled = torch.compile(model, backend="facto", options={"inr": 0.3, "apply_ratio": 1.0})

Dynamo hands over graphs where parameters are inputs and layers are functions (torch.conv2d,
linear, relu, max_pool2d, batch_norm, a multiply by a scalar parameter); unlike symbolic_trace it
splits a model at data-dependent Python control flow instead of failing, and each piece is
planned on its own (apply_ratio and the input-layer rule apply per piece). Matching, planning and
rewriting are the FX pass's own; only the site differs: a method's layer (Facto's M and D) is
kept as a `facto` child of the user's module that owns the weight, so it is in the model's
state_dict, moves with `.to()` and is reused by recompilations, and its tensors enter the graph as
extra inputs. Run one forward pass before building the optimizer (or loading a checkpoint), then
take `facto_fx.low_rank_parameters(model)` (or all parameters: W gets no gradient). The rewritten
graph then goes to inductor.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable

import torch
from torch import Tensor, fx, nn
from torch._subclasses.fake_tensor import DynamicOutputShapeException, unset_fake_temporarily

from facto_fx.config import FactoConfig
from facto_fx.matches import Match, call_args
from facto_fx.methods import method_handler
from facto_fx.passes.match import GraphTensors, find_matches
from facto_fx.passes.rewrite import rewrite, to_function
from facto_fx.passes.schedule import schedule
from facto_fx.triton_ops.dispatch import use_kernels

CHILD = "facto"  # the attribute of the user's module that holds its method layer


def _qualified_name(placeholder: fx.Node) -> str:
    """'L_self_modules_features_modules_0_parameters_weight_' -> 'features.0.weight'."""
    name = str(placeholder.target)
    match = re.search(r"_(modules|parameters|buffers)_", name)
    path = name[match.start() + 1 :] if match else name
    parts = re.split(r"_modules_|_parameters_|_buffers_|^modules_|^parameters_|^buffers_", path)
    return ".".join(p for p in parts if p).rstrip("_")


def _owning_module(placeholder: fx.Node, weight: Tensor) -> nn.Module:
    """The user's module that holds `weight`, found from dynamo's record of where the graph input
    came from (its source, resolved in the frame being compiled)."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    grapharg = placeholder.meta.get("grapharg")
    tx = InstructionTranslator.current_tx()
    source = getattr(grapharg, "source", None)
    while tx is not None and source is not None and hasattr(source, "base"):
        source = source.base
        value = tx.output.resolve_source_value(source)
        if isinstance(value, nn.Module) and any(p is weight for p in value.parameters(recurse=False)):
            return value
    raise RuntimeError(
        f"the facto backend cannot find the module that owns '{_qualified_name(placeholder)}' "
        "(it is called outside torch.compile, or dynamo no longer records graph-input sources); "
        "use facto_fx.compile(model) instead"
    )


def _same_layer(kept: nn.Module, new: nn.Module) -> bool:
    """Whether a layer kept from an earlier compilation computes what `new` would."""
    if type(kept) is not type(new):
        return False
    for a, b in zip(kept.arguments(), new.arguments(), strict=True):
        if isinstance(a, Tensor) != isinstance(b, Tensor) or (a.shape != b.shape if isinstance(a, Tensor) else a != b):
            return False
    return True


class CapturedSite:
    """The backend's RewriteSite: parameters are lifted placeholders, layers become calls of their
    `functional` with their tensors as extra trailing graph inputs."""

    def __init__(self, gm: fx.GraphModule, tensors: GraphTensors, seed: int) -> None:
        self.gm, self.tensors, self.seed = gm, tensors, seed
        self.inputs = {id(t): node for node, (_, t) in tensors.lifted.items()}
        self.extra: list[tuple[nn.Module, int]] = []  # (layer, position in layer.arguments())

    def tensor(self, node: object) -> Tensor | None:
        return self.tensors.tensor(node)

    def use_function(self, node: fx.Node, function: Callable, args: tuple, kwargs: dict) -> None:
        to_function(node, function, args, kwargs)

    def use_layer(self, match: Match, layer: nn.Module) -> None:
        args = call_args(match.node)
        layer = self._adopt(args["weight"], layer)
        operands = [
            self.inputs.get(id(value)) or self._extra_input(layer, position) if isinstance(value, Tensor) else value
            for position, value in enumerate(layer.arguments())
        ]
        to_function(match.node, layer.functional, (args["input"], *operands), {})

    def _extra_input(self, layer: nn.Module, position: int) -> fx.Node:
        last = [n for n in self.gm.graph.nodes if n.op == "placeholder"][-1]
        with self.gm.graph.inserting_after(last):
            node = self.gm.graph.placeholder(f"facto_input_{len(self.extra)}")
        self.extra.append((layer, position))
        return node

    def _adopt(self, weight_node: fx.Node, layer: nn.Module) -> nn.Module:
        """Keep `layer` as the `facto` child of the user's module that owns the weight, or reuse the
        one an earlier compilation put there. The layer refers to the module's own parameters
        without registering them again."""
        name, weight = self.tensors.lookup(weight_node)
        owner = _owning_module(weight_node, weight)
        kept = getattr(owner, CHILD, None)
        inputs = {key: value for key, value in layer.named_parameters(recurse=False) if id(value) in self.inputs}
        if kept is not None:
            if not _same_layer(kept, layer):
                raise RuntimeError(
                    f"'{name.rpartition('.')[0]}' already has a {type(kept).__name__} from an earlier facto "
                    f"compilation with other options; recompiling with new options needs a fresh model"
                )
        target = layer if kept is None else kept
        for key, value in inputs.items():  # the owner's current tensors (a load with assign=True replaces them)
            if kept is None:
                delattr(layer, key)  # registered on the fresh layer; a kept one holds them unregistered
            object.__setattr__(target, key, value)
        if kept is None:
            owner.add_module(CHILD, layer)
        return target


def rewrite_captured(gm: fx.GraphModule, example_inputs: list, config: FactoConfig) -> CapturedSite:
    """Apply the pass to one dynamo graph in place; the site lists the extra inputs it added."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    lifted = {
        n: (_qualified_name(n), v) for n, v in zip(placeholders, example_inputs, strict=False)
        if isinstance(v, Tensor) and re.search(r"_(parameters|buffers)_", str(n.target))
    }
    tensors = GraphTensors(gm, lifted)
    matches = find_matches(gm, tensors)
    # A name may belong to another piece of a model dynamo split: names are not checked per piece.
    decisions = schedule(gm, matches, config, check_names=False)
    gm.meta["facto_decisions"] = decisions
    site = CapturedSite(gm, tensors, config.seed)
    requires_grad = {id(t): t.requires_grad for _, t in lifted.values()}
    try:
        with unset_fake_temporarily(), torch.no_grad():  # real layer tensors that outlive this compilation
            rewrite(gm, matches, decisions, site)
    finally:
        # Layers freeze the weights they train around; dynamo guards on requires_grad, and the
        # graph gives those weights no gradient anyway: leave every input as dynamo saw it.
        for _, tensor in lifted.values():
            tensor.requires_grad_(requires_grad[id(tensor)])
    return site


def facto_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None):
    """torch.compile backend: rewrite the captured graph, then compile it with inductor."""
    from torch._inductor.compile_fx import compile_fx

    config = FactoConfig(**(options or {}))
    chosen = [*config.methods.values(), config.fallback, config.row_strips]
    eager_only = sorted({type(m).__name__ for m in chosen if m and not method_handler(m).compiles})
    if eager_only:
        raise ValueError(
            f"{', '.join(eager_only)} cannot run inside a compiled graph (saved-tensor hooks or checkpointed "
            "strips act at run time); apply it with facto_fx.compile(model, ...) and torch.compile the result "
            "(default backend)"
        )
    # Rewrite a copy: dynamo keeps reading its own graph after the backend returns. The copy is a
    # fresh GraphModule, so inductor treats the extra inputs as plain runtime inputs.
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    gm = fx.GraphModule(gm, graph)
    site = rewrite_captured(gm, example_inputs, config)

    def extra() -> list[Tensor]:
        # Read at every call: `.to()` replaces a layer's buffers, merges update them in place.
        # One arguments() per layer, however many of its tensors are inputs.
        current = {id(layer): layer.arguments() for layer, _ in site.extra}
        return [current[id(layer)][position] for layer, position in site.extra]

    # The extra inputs enter as fakes with static shapes: symbolic sizes would add guards on tensors
    # dynamo never saw.
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    extra_examples = [fake_mode.from_tensor(t, static_shapes=True) if fake_mode else t for t in extra()]
    try:
        compiled = compile_fx(gm, [*example_inputs, *extra_examples])
    except DynamicOutputShapeException as error:
        # Dynamo would quietly run the model eagerly, without the pass: say so instead.
        raise RuntimeError(
            f"{error.func} keeps codes of data-dependent size (HOSVD / SVD ranks); under backend='facto' set "
            "torch._dynamo.config.capture_dynamic_output_shape_ops = True before compiling"
        ) from error

    def run(*args):
        with use_kernels(config.kernels) if config.kernels != "auto" else contextlib.nullcontext():
            return compiled(*args, *extra())

    return run


def register(name: str = "facto") -> None:
    """Make backend="facto" available once facto_fx is imported.

    When torch itself imports facto_fx through the `torch_dynamo_backends` entry point, it
    registers the function right after; registering here too would be a duplicate.
    """
    from torch._dynamo.backends import registry

    if name not in registry._COMPILER_FNS and registry._BACKENDS.get(name) is None:
        registry.register_backend(facto_backend, name=name)
