"""The method seam: a memory-saving method is a config (what the user picks per layer) plus a
handler (how the pass applies it), registered together (docs/design.md §6).

A handler says which matched layers it can take, rewrites one through a `RewriteSite` (the FX
pass's graph or a graph dynamo captured: the handler does not know which), and optionally acts
after each optimizer step, exports its layers back to dense tensors, and estimates its saved bytes
where autograd's hooks cannot see them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import Tensor, fx, nn

from facto_fx.matches import Match


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config: a frozen, validated dataclass the user passes per layer.

    `label` names the method in reports; `saves_memory` is False for a rewrite that keeps every
    saved tensor (frozen batch-norm at full resolution), which the scheduler counts as dense.
    """

    label: ClassVar[str] = "method"

    @property
    def saves_memory(self) -> bool:
        return True


@dataclass(frozen=True)
class Last:
    """A `methods` key selecting the last `n` layers of `kinds`, counted from the output in
    execution order (the HOSVD paper's "last N conv layers"): methods={Last(4): ...}."""

    n: int
    kinds: tuple[str, ...] = ("conv2d",)

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"Last(n): n must be an integer >= 1 (layers counted from the output); got {self.n!r}")
        if isinstance(self.kinds, str) or not self.kinds:
            raise ValueError(f"Last(kinds=...) must be a non-empty tuple of layer kinds; got {self.kinds!r}")
        object.__setattr__(self, "kinds", tuple(self.kinds))


@dataclass(frozen=True)
class PlanContext:
    """What the scheduler knows about a layer beyond its match, for `Method.refuses`."""

    input_layer: bool  # a conv / linear that sees the data itself (no conv / linear upstream)


@dataclass(frozen=True)
class StepOptions:
    """The per-optimizer-step schedule `attach` was given, handed to every method's `after_step`."""

    merge_every: int
    w_decay: float = 0.0
    probe: Callable[[], Tensor] | None = None  # a loss on a few training samples, for gradient directions


class RewriteSite(Protocol):
    """Where a rewrite lands: the FX pass's GraphModule, or a graph dynamo captured.

    Both expose parameters by graph node and rewrite nodes in place, so one handler serves both.
    """

    seed: int

    def tensor(self, node: object) -> Tensor | None:
        """The parameter or buffer a graph node reads (get_attr, or a lifted placeholder), else None."""

    def use_layer(self, match: Match, layer: nn.Module) -> None:
        """Make the matched node compute `layer(x)`: a module swap, or a call of `layer.functional`
        with `layer.arguments()` where the graph has no modules (dynamo's)."""

    def use_function(self, node: fx.Node, function: Callable, args: tuple, kwargs: dict) -> None:
        """Make `node` a call of `function(*args, **kwargs)` (arguments may be graph nodes)."""


class Method:
    """How the pass applies one kind of MethodConfig. Subclass, then `register_method(Config)`."""

    kinds: ClassVar[frozenset[str]] = frozenset()  # match kinds (passes.match) it can rewrite
    wraps_op: ClassVar[bool] = False  # runs the op itself as it is (a batch-norm keeps its batch statistics)
    compiles: ClassVar[bool] = True  # False: acts at run time only, so the "facto" dynamo backend refuses it
    analytic_note: ClassVar[str | None] = None  # what the analytic (meta) report's figure for its layers is
    modules: ClassVar[tuple[type[nn.Module], ...]] = ()  # the layer types its rewrites create

    def refuses(self, match: Match, method: MethodConfig, context: PlanContext) -> str | None:
        """Why this method cannot take a layer of a kind it knows (None: it can)."""
        return None

    def rewrite(self, site: RewriteSite, match: Match, method: MethodConfig) -> None:
        raise NotImplementedError

    def rewrite_region(self, gm: fx.GraphModule, method: MethodConfig) -> tuple[list[str], str | None, str]:
        """Rewrite a chain of nodes at once (after every per-layer rewrite) for a method that acts
        on regions, not layers (row strips); return the names of the nodes it took, the node that
        now runs them (None: it took none) and a note for the report."""
        raise NotImplementedError(f"{type(self).__name__} does not rewrite regions")

    def wrap(self, site: RewriteSite, node: fx.Node, kind: str, method: MethodConfig) -> None:
        """Run `node` (already rewritten by another method, or not) through this method; only for
        handlers that `wraps_op`."""
        raise NotImplementedError(f"{type(self).__name__} does not wrap ops")

    def after_step(self, layers: Sequence[nn.Module], optimizer: torch.optim.Optimizer, step: int,
                   options: StepOptions) -> bool:
        """Run after optimizer step number `step` on this method's layers; True if it reset them."""
        return False

    def reset(self, layers: Sequence[nn.Module], optimizer: torch.optim.Optimizer, options: StepOptions) -> None:
        """Restart whatever the method accumulates (Facto: merge-and-reinit); a no-op by default."""

    def trainable(self, layer: nn.Module) -> list[nn.Parameter]:
        """Parameters the method adds; the optimizer must see them, without weight decay."""
        return []

    def dense_state(self, layer: nn.Module) -> dict[str, Tensor]:
        """The original layer's tensors as this layer computes them now (e.g. a merged weight)."""
        return {}

    def describe(self, layer: nn.Module, x: Tensor) -> str | None:
        """A note for the report on what `layer` keeps for input `x` (HOSVD: the ranks chosen)."""
        return None

    def node_note(self, node: fx.Node) -> str | None:
        """A note for the report from a rewritten node's own state after a real run (what a
        method without layers, whose state lives in the node's target, kept)."""
        return None

    def node_state(self, node: fx.Node) -> dict | None:
        """State a rewritten node keeps outside any module (so outside state_dict), for checkpoints."""
        return None

    def load_node_state(self, node: fx.Node, state: dict) -> None:
        """Inverse of `node_state`."""

    def summarize(self, nodes: Sequence[fx.Node]) -> str | None:
        """One line on what this method's nodes kept lately, for the training log (None: nothing)."""
        return None

    def saved_bytes(self, method: MethodConfig, node: fx.Node, args: tuple, kwargs: dict) -> int | None:
        """Bytes the node keeps for backward, from its (meta) arguments; None: count with autograd's
        hooks. Needed where the hooks cannot see the real size (variable-length codes)."""
        return None


_METHODS: dict[type[MethodConfig], Method] = {}


def module_tensors(graph: fx.Graph, node: fx.Node, module: nn.Module, names: Sequence[str]) -> list[fx.Node | None]:
    """get_attr nodes, inserted before `node` (a call of `module`), reading the module's tensors
    `names`; None for one the module does not have (a norm without affine parameters): the
    arguments of the module's functional form."""
    with graph.inserting_before(node):
        return [graph.get_attr(f"{node.target}.{name}") if getattr(module, name) is not None else None
                for name in names]


def register_method(config: type[MethodConfig]) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make `config` usable in `compile(methods=...)`, applied by the decorated handler."""
    if not (isinstance(config, type) and issubclass(config, MethodConfig)):
        raise TypeError(f"register_method takes a MethodConfig subclass; got {config!r}")

    def register(handler: type[Method]) -> type[Method]:
        if not (isinstance(handler, type) and issubclass(handler, Method)):
            raise TypeError(f"register_method({config.__name__}) decorates a Method subclass; got {handler!r}")
        if not handler.kinds and handler.rewrite_region is Method.rewrite_region:
            raise ValueError(f"{handler.__name__}.kinds is empty: name the match kinds it rewrites")
        if config in _METHODS:
            raise ValueError(f"{config.__name__} is already registered (to {type(_METHODS[config]).__name__})")
        shared = [m.__name__ for h in _METHODS.values() if type(h) is not handler for m in h.modules
                  if m in handler.modules]
        if shared:
            raise ValueError(f"{handler.__name__} creates {shared}, which another method's layers already are")
        _METHODS[config] = handler()
        return handler

    return register


def method_handler(method: MethodConfig) -> Method:
    """The handler registered for `method`'s config type."""
    handler = _METHODS.get(type(method))
    if handler is None:
        known = ", ".join(sorted(c.__name__ for c in _METHODS))
        raise ValueError(
            f"{type(method).__name__} is not a registered method (known: {known}); "
            "decorate its handler with facto_fx.methods.register_method"
        )
    return handler


def layer_handler(layer: nn.Module) -> Method | None:
    """The handler whose rewrites create modules of `layer`'s type, if any."""
    return next((h for h in _METHODS.values() if h.modules and isinstance(layer, h.modules)), None)


def method_layers(model: nn.Module) -> list[tuple[str, nn.Module, Method]]:
    """Every (qualified name, layer, handler) a method created in `model`, in module order."""
    found = []
    for name, module in model.named_modules():
        handler = layer_handler(module)
        if handler is not None:
            found.append((name, module, handler))
    return found


def method_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter a method added to `model` (Facto's M): an optimizer must see them, and
    they take no weight decay (docs/design.md §3)."""
    return [p for _, layer, handler in method_layers(model) for p in handler.trainable(layer)]


@torch.no_grad()
def method_notes(model: nn.Module, inputs: tuple[Tensor, ...]) -> dict[str, str]:
    """Each method layer's `describe` note for one forward pass on `inputs` (real tensors), by
    qualified name; no forward pass at all when no method has notes."""
    notes: dict[str, str] = {}

    def record(name: str, handler: Method):
        def hook(layer: nn.Module, args: tuple, _output: object) -> None:
            note = handler.describe(layer, args[0])
            if note is not None and name not in notes:
                notes[name] = note

        return hook

    handles = [
        layer.register_forward_hook(record(name, handler)) for name, layer, handler in method_layers(model)
        if type(handler).describe is not Method.describe
    ]
    if not handles:
        return notes
    try:
        model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return notes
