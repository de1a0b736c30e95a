"""Facto (docs/design.md §1-3): a frozen W trained as W + M·D, with pooled, projected saved maps.

Conv and linear layers become FactoConv2d / FactoLinear; scale and frozen batch-norm layers save
their input mean-pooled. After optimizer steps, W is regularised and merged on schedule.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, fx, nn

from facto_fx import ops
from facto_fx.dtypes import parse_dtype
from facto_fx.layers import FactoBatchNorm, FactoConv2d, FactoLinear
from facto_fx.matches import BATCH_NORM, CONV, LINEAR, SCALE, Match, call_args
from facto_fx.methods.base import Method, MethodConfig, PlanContext, RewriteSite, StepOptions, register_method
from facto_fx.methods.fixed_rate import codes_note
from facto_fx.methods.frozen import rewrite_batch_norm
from facto_fx.ops.quantized import DEFAULT_GROUP, check_bits

DIRECTIONS = ("gaussian", "orthonormal", "gradient")
SCALES = ("unbiased", "paper")


@dataclass(frozen=True)
class FactoLowRank(MethodConfig):
    """Facto on one layer.

    inr: internal node ratio, C_R = round(inr * C_I) (paper §3.1.1), in (0, 1].
    lossy_kernel: k of the mean-pool that compresses saved maps (paper §3.3); 1 = no pooling.
    storage_dtype: dtype of compressed maps; None keeps the activation dtype.
    direction: how D is drawn: "gaussian" (the paper: unit-norm Gaussian rows times α),
        "orthonormal" (the same norms, rows orthogonal: SGD on M is SGD on Ω within D's row space;
        layers.draw_direction), or "gradient": at every merge, the top singular directions of the
        layer's weight gradient on a few training samples (layers.gradient_direction), which needs
        `attach(..., probe=...)` to compute that gradient.
    scale: the norm α of drawn D's rows: "unbiased" (α² = I/R, so an SGD step on M is in
        expectation the full-rank SGD step on Ω) or "paper" (α⁴ = I/R, eq. 13: the expected step is
        sqrt(R/I) of it); layers.direction_norm says why "unbiased" is the default.
    batch_statistics: a batch-norm layer trains on batch statistics, its backward reading x̂ from
        the pooled copy (FactoConfig(batch_norm="lossy"), the default), or, if False, on frozen
        statistics (FactoConfig(batch_norm="freeze")).
    pooled_bits: a batch-norm keeps its pooled x̂ as the fixed-rate store's codes, this many bits
        per element (2, 4 or 8; stochastically rounded, unbiased; ops/batch_norm.py); None keeps it
        in storage_dtype. `compile` sets it to its store_bits.
    """

    label = "facto"

    inr: float = 0.3
    lossy_kernel: int = 2
    storage_dtype: torch.dtype | str | None = None
    direction: Literal["gaussian", "orthonormal", "gradient"] = "gaussian"
    batch_statistics: bool = True
    scale: Literal["unbiased", "paper"] = "unbiased"
    pooled_bits: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.inr, bool) or not isinstance(self.inr, (int, float)) or not (
            0.0 < self.inr <= 1.0
        ):
            raise ValueError(f"inr must be a number in (0, 1] (the paper uses 0.2-0.4); got {self.inr!r}")
        if isinstance(self.lossy_kernel, bool) or not isinstance(self.lossy_kernel, int) or self.lossy_kernel < 1:
            raise ValueError(
                f"lossy_kernel must be an integer >= 1 (1 disables pooling, the paper uses 2); "
                f"got {self.lossy_kernel!r}"
            )
        object.__setattr__(self, "storage_dtype", parse_dtype(self.storage_dtype))
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(map(repr, DIRECTIONS))}; got {self.direction!r}")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(map(repr, SCALES))}; got {self.scale!r}")
        if not isinstance(self.batch_statistics, bool):
            raise ValueError(f"batch_statistics must be True or False; got {self.batch_statistics!r}")
        if self.pooled_bits is not None:
            try:
                check_bits(self.pooled_bits)
            except ValueError as error:
                raise ValueError(f"FactoLowRank(pooled_bits=...): {error} (None keeps the pooled maps uncoded)"
                                 ) from None

    def rank(self, features: int) -> int:
        """Internal rank for a layer with `features` input channels / nodes (at least 1)."""
        return max(1, min(features, round(self.inr * features)))


def layer_seed(seed: int, layer: str) -> int:
    """Seed of a layer's D: the same on every process and every run with the same config."""
    return seed * 2**32 + zlib.crc32(layer.encode())


def _conv_problem(match: Match) -> str | None:
    if match.module is not None:
        groups, padding, mode = match.module.groups, match.module.padding, match.module.padding_mode
    else:
        args = call_args(match.node)
        groups, padding, mode = args["groups"], args["padding"], "zeros"
    if groups != 1:
        return f"grouped convolution (groups={groups}) is not supported; left dense and trainable"
    if mode != "zeros":
        return f"padding_mode='{mode}' is not supported; left dense and trainable"
    if isinstance(padding, str):
        return f"padding='{padding}' is not supported; left dense and trainable"
    return None


def _low_rank_layer(site: RewriteSite, match: Match, method: FactoLowRank) -> nn.Module:
    """The FactoConv2d / FactoLinear for a matched module or functional call."""
    seed, k, dtype = layer_seed(site.seed, match.layer), method.lossy_kernel, method.storage_dtype
    direction, scale = method.direction, method.scale
    module = match.module
    if module is not None:
        if match.kind == CONV:
            rank = method.rank(module.in_channels)
            return FactoConv2d.from_conv(module, rank, k, dtype, seed, direction=direction, scale=scale)
        return FactoLinear.from_linear(module, method.rank(module.in_features), dtype, seed, direction=direction,
                                       scale=scale)
    args = call_args(match.node)
    weight, bias = site.tensor(args["weight"]), site.tensor(args["bias"])
    rank = method.rank(weight.shape[1])
    if match.kind == CONV:
        return FactoConv2d(weight, bias, args["stride"], args["padding"], args["dilation"], rank, k, dtype, seed,
                           direction=direction, scale=scale)
    return FactoLinear(weight, bias, rank, dtype, seed, direction=direction, scale=scale)


def weight_gradients(layers: Sequence[nn.Module], probe: Callable[[], Tensor] | None) -> dict[nn.Module, Tensor]:
    """Each layer's dense weight gradient ∂loss/∂Ω on the loss `probe()` returns, from the input
    and output gradient it sees (so no `.grad` is touched); summed over the processes of a
    distributed run, so that every process takes the same directions."""
    if probe is None:
        names = ", ".join(repr(layer) for layer in layers[:3])
        raise ValueError(f"{len(layers)} Facto layers take D from the weight gradient (direction='gradient'; "
                         f"{names}...): pass attach(..., probe=<a function returning the loss on a few "
                         "training samples>)")
    seen: dict[nn.Module, tuple[Tensor, Tensor, int]] = {}

    def capture(layer: nn.Module, args: tuple, output: Tensor) -> None:
        seen[layer] = (args[0].detach(), output, output._version)

    handles = [layer.register_forward_hook(capture) for layer in layers]
    try:
        loss = probe()
    finally:
        for handle in handles:
            handle.remove()
    missing = [layer for layer in layers if layer not in seen]
    if missing:
        raise RuntimeError(
            f"{len(missing)} Facto layers with direction='gradient' were not called as modules by the probe "
            f"(e.g. {missing[0]!r}): gradient directions need the model facto_fx.compile built, without row "
            "strips over those layers"
        )
    changed = [layer for layer in layers if seen[layer][1]._version != seen[layer][2]]
    if changed:  # autograd would give the gradient of what overwrote it, silently
        raise RuntimeError(
            f"the output of {len(changed)} Facto layers with direction='gradient' was modified in place after them "
            f"(e.g. {changed[0]!r}, by an inplace ReLU?): gradient directions need those outputs as the layers "
            "returned them; use out-of-place ops there (binarize_activations=True rewrites ReLUs out of place)"
        )
    outputs = [seen[layer][1] for layer in layers]
    grads = torch.autograd.grad(loss, outputs, allow_unused=True)
    result = {}
    for layer, grad_y in zip(layers, grads, strict=True):
        x = seen[layer][0]
        # in float32: under autocast x and grad_y may be bf16 or of different dtypes
        gradient = (torch.zeros_like(layer.weight, dtype=torch.float32) if grad_y is None
                    else layer.weight_gradient(x.float(), grad_y.float()))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(gradient)
        result[layer] = gradient
    return result


@register_method(FactoLowRank)
class Facto(Method):
    kinds = frozenset({CONV, LINEAR, SCALE, BATCH_NORM})
    modules = (FactoConv2d, FactoLinear)

    def refuses(self, match: Match, method: MethodConfig, context: PlanContext) -> str | None:
        if context.input_layer:
            return "input layer: never compressed (paper §4.2)"
        return _conv_problem(match) if match.kind == CONV else None

    def rewrite(self, site: RewriteSite, match: Match, method: FactoLowRank) -> None:
        node = match.node
        if match.kind in (CONV, LINEAR):
            site.use_layer(match, _low_rank_layer(site, match, method))
        elif match.kind == SCALE:
            x, s = node.args if site.tensor(node.args[1]) is not None else node.args[::-1]
            site.use_function(node, ops.scale, (x, s), {"lossy_kernel": method.lossy_kernel,
                                                         "storage_dtype": method.storage_dtype})
        else:
            rewrite_batch_norm(site, match, method.lossy_kernel, method.storage_dtype, method.batch_statistics,
                               method.pooled_bits)

    def after_step(self, layers: Sequence[nn.Module], optimizer: torch.optim.Optimizer, step: int,
                   options: StepOptions) -> bool:
        """W ← W − λ·Ω after every step (paper eq. 14); merge-and-reinit every `merge_every` steps."""
        if options.w_decay:
            for layer in layers:
                layer.regularize(options.w_decay)
        if step % options.merge_every:
            return False
        self.reset(layers, optimizer, options)
        return True

    def reset(self, layers: Sequence[nn.Module], optimizer: torch.optim.Optimizer, options: StepOptions) -> None:
        """W ← W + M·D, M ← 0, a fresh D (drawn, or from the weight gradient on `options.probe` for
        direction "gradient"), and M's optimizer state cleared (momentum, moments, step)."""
        with torch.no_grad():
            for layer in layers:
                layer.merge()
        from_gradient = [layer for layer in layers if layer.direction == "gradient"]
        gradients = weight_gradients(from_gradient, options.probe) if from_gradient else {}
        with torch.no_grad():
            for layer in layers:
                if layer in gradients:
                    layer.redraw_from_gradient(gradients[layer])
                else:
                    layer.redraw()
                optimizer.state.pop(layer.M, None)

    def trainable(self, layer: nn.Module) -> list[nn.Parameter]:
        return [layer.M]

    def node_note(self, node: fx.Node) -> str | None:
        """A batch-norm's kept x̂: its pool and, where coded, its bits per element."""
        if node.op == "call_module":
            layer = node.graph.owning_module.get_submodule(node.target)
            if not isinstance(layer, FactoBatchNorm):
                return None
            k, bits = layer.lossy_kernel, layer.bits
        elif node.target in (ops.batch_norm_in_mode, ops.batch_norm):
            k, bits = node.kwargs["lossy_kernel"], node.kwargs.get("bits")
        else:
            return None
        codes = "" if bits is None else f" in {codes_note(bits, DEFAULT_GROUP)}"
        meta = node.meta.get("tensor_meta")
        if k == 1 or (meta is not None and len(getattr(meta, "shape", ())) != 4):  # only N×C×H×W maps pool
            return f"x̂ kept whole{codes}"
        return f"x̂ pooled {k}×{k}{codes}"

    def dense_state(self, layer: nn.Module) -> dict[str, Tensor]:
        return {"weight": layer.merged_weight()}
