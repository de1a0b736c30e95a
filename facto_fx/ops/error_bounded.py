"""Run any op with the feature maps it saves for backward held error-bounded compressed
(eb_codec), whatever the op: conv (any groups), linear, batch-norm with batch statistics,
layer / group norm, SiLU / GELU / sigmoid, a squeeze-excite multiply...

The op runs unchanged under a pair of saved-tensor hooks. Its forward output is exact; each saved
tensor that is one of its feature maps is compressed when saved (kept as it is where its codes
would not be smaller: noise at a tiny eb) and decompressed when backward asks for it, so the
backward runs on x̂ with |x̂ − x| ≤ eb element-wise. Saved tensors that are not feature maps stay
exact: parameters and their casts (so a conv's grad_X, which needs only W,
is exact and only grad_W sees the error), and statistics such as batch-norm's mean and inverse std
(a feature map is a saved tensor as large as the op's largest tensor argument: a squeeze-excite
product rebuilds the map, not its small gate).

**Nesting.** The hooks in force when the op is called (facto_fx's saved-bytes count, a user's
CPU offload) still see what is saved: each code tensor goes through them, so a measurement counts
the compressed bytes, and an offload moves the codes.

**torch.compile.** Saved-tensor hooks act at run time, on real tensors; `compressed_call` is
therefore kept out of compiled graphs (a graph break around each such op), never traced.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from facto_fx import eb_format
from facto_fx.ops import eb_codec
from facto_fx.ops.error_bound import ErrorBound
from facto_fx.shapes import is_channels_last
from facto_fx.triton_ops.dispatch import use_triton


def _codec(x: Tensor):
    if use_triton(x) and x.dtype != torch.float64:
        from facto_fx.triton_ops import eb_codec as triton_codec

        return triton_codec
    return eb_codec


def _from_parameter(t: Tensor) -> bool:
    """A parameter, or a chain of single-input steps (casts, views) from one: autocast's bf16
    weight, its transpose inside linear."""
    if isinstance(t, nn.Parameter):
        return True
    fn = t.grad_fn
    while fn is not None:
        inputs = [nxt for nxt, _ in fn.next_functions if nxt is not None]
        if len(inputs) != 1:
            return False
        fn = inputs[0]
        if hasattr(fn, "variable"):  # AccumulateGrad: the chain starts at a leaf
            return isinstance(fn.variable, nn.Parameter)
    return False


def _descends_from(t: Tensor, x: Tensor, depth: int = 3) -> bool:
    """Whether autograd's graph leads from t back to x within `depth` steps (a cast of x, the
    op's own output computed from x)."""
    target = x.grad_fn
    frontier = [t.grad_fn]
    for _ in range(depth):
        frontier = [nxt for fn in frontier if fn is not None for nxt, _ in fn.next_functions if nxt is not None]
        if any(fn is target if target is not None else getattr(fn, "variable", None) is x for fn in frontier):
            return True
    return False


def _is_feature_map(t: Tensor, x: Tensor) -> bool:
    """A saved tensor that is the op's feature map x, or computed from it, with its size; never a
    parameter, a tensor computed from parameters (a parametrized weight) or a statistic."""
    if not t.is_floating_point() or t.numel() != x.numel() or isinstance(t, nn.Parameter):
        return False
    if t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        return True
    if t.grad_fn is None:  # no history: an op's internal result (a frozen batch-norm's x̂), a cast of data
        return True
    return _descends_from(t, x) and not _from_parameter(t)


class _Saved:
    """What autograd keeps for one saved tensor: its codes (or the tensor, where the codes would
    not be smaller or it is no feature map), each through the outer hooks, and the version it had,
    so that an in-place change before backward is an error, as it is without hooks (autograd skips
    its own check for tensors saved through hooks)."""

    __slots__ = ("codes", "exact", "shape", "dtype", "channels_last", "eb", "codec", "source", "version")

    def __init__(self, t: Tensor, outer_pack: Callable | None, codes: eb_format.Codes | None = None,
                 codec: object = None, eb: float = 0.0) -> None:
        self.source, self.version = weakref.ref(t), t._version
        self.exact = None if codes is not None else (outer_pack(t) if outer_pack else t)
        self.codes = None if codes is None else tuple(outer_pack(c) if outer_pack else c for c in codes)
        if codes is not None:  # what decompress needs; nothing to compute for a tensor kept as it is
            self.shape, self.dtype, self.eb, self.codec = t.shape, t.dtype, eb, codec
            self.channels_last = is_channels_last(t)

    def restore(self, outer_unpack: Callable | None) -> Tensor:
        source = self.source()
        if source is not None and source._version != self.version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace operation: "
                f"a {tuple(source.shape)} tensor saved by an ErrorBounded op is at version {source._version}; "
                f"expected version {self.version} instead"
            )
        if self.codes is None:
            return outer_unpack(self.exact) if outer_unpack else self.exact
        codes = eb_format.Codes(*(outer_unpack(c) if outer_unpack else c for c in self.codes))
        return self.codec.decompress(codes, self.shape, self.dtype, self.eb, self.channels_last)


class saving_compressed(torch.autograd.graph.saved_tensors_hooks):
    """Context manager: feature maps of the op on `x` (x, or tensors of its size computed from
    it), saved for backward inside the block, are held compressed within `eb_of(map)`; `on_pack`
    hears (eb, codes bytes, dense bytes) of each."""

    def __init__(self, eb_of: Callable[[Tensor], float], x: Tensor,
                 on_pack: Callable[[float, int, int], None] | None = None) -> None:
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        outer_pack, outer_unpack = outer if outer is not None else (None, None)

        def pack(t: Tensor) -> _Saved:
            if not _is_feature_map(t, x):
                return _Saved(t, outer_pack)
            eb = eb_format.check_bound(eb_of(t))
            dense = t.numel() * t.element_size()
            codec = _codec(t)
            codes = codec.compress(t.detach(), eb)
            if on_pack is not None:
                on_pack(eb, min(codes.nbytes, dense), dense)
            if codes.nbytes >= dense:  # never keep more than the map itself (noise at a tiny eb)
                return _Saved(t, outer_pack)
            return _Saved(t, outer_pack, codes, codec, eb)

        def unpack(saved: _Saved) -> Tensor:
            return saved.restore(outer_unpack)

        super().__init__(pack, unpack)


def _feature_map(args: tuple, kwargs: dict) -> Tensor | None:
    """The call's largest float tensor argument that is not a parameter: its feature map."""
    maps = [t for t in tree_leaves((args, kwargs))
            if isinstance(t, Tensor) and t.is_floating_point() and not isinstance(t, nn.Parameter) and t.numel() > 1]
    return max(maps, key=Tensor.numel, default=None)


def _weight(fn: Callable, args: tuple) -> Tensor | None:
    """The layer's weight: the module's, or a functional conv / linear's parameter argument."""
    weight = getattr(fn, "weight", None)
    if isinstance(weight, Tensor):
        return weight
    return next((a for a in args if isinstance(a, nn.Parameter)), None)


@torch.compiler.disable
def compressed_call(bound: ErrorBound, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs), saving its feature maps compressed within the bound's eb; a plain call
    when nothing will be differentiated. An adaptive bound's measuring call keeps them exact."""
    x = _feature_map(args, kwargs)
    # Meta tensors (analytic reports) have no values to compress: the plain call gives the shapes.
    if not torch.is_grad_enabled() or x is None or x.is_meta:
        return fn(*args, **kwargs)
    eb_of = bound.choose()
    if eb_of is None:
        y = fn(*args, **kwargs)
        weight = _weight(fn, args)
        if weight is not None and isinstance(y, Tensor):
            bound.measure(x, y, weight)
        return y
    packed: list[tuple[float, int, int]] = []
    with saving_compressed(eb_of, x, lambda *sizes: packed.append(sizes)):
        y = fn(*args, **kwargs)
    if packed:
        bound.record(packed[0][0], sum(k for _, k, _ in packed), sum(d for _, _, d in packed))
    return y


class CompressedFunction:
    """`fn` called through `compressed_call(bound, fn, ...)`, as one named, picklable callable: the
    target of an FX node (FX writes a node's target into its code by name, never an argument).
    fn=None calls the first argument (a module the graph reads with get_attr)."""

    def __init__(self, fn: Callable | None, bound: ErrorBound) -> None:
        self.fn, self.bound = fn, bound
        name = "module" if fn is None else getattr(fn, "__name__", type(fn).__name__)
        self.__name__ = self.__qualname__ = f"error_bounded_{name}"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.fn is None:
            return compressed_call(self.bound, args[0], *args[1:], **kwargs)
        return compressed_call(self.bound, self.fn, *args, **kwargs)

    def __repr__(self) -> str:
        return f"{self.__name__}({self.bound!r})"
