"""facto::quantized_layer_norm / facto::quantized_group_norm — layer and group norm whose backward
keeps x̂ in the fixed-rate store (ops/quantized.py) and 1/σ per normalised row, not x.

The forward is torch's own (aten.native_layer_norm / native_group_norm), bit for bit. For every row
r that is normalised together (a position's channels in layer norm, a sample's group in group norm),
with x̂ = (x − μ_r)/σ_r and ĝ = g·γ, torch's backward is

    grad_x = (1/σ_r) · (ĝ − mean_r(ĝ) − x̂ · mean_r(ĝ · x̂)),   grad_γ = Σ g · x̂,   grad_β = Σ g,

which reads x only through x̂. So the op keeps x̂ as `bits`-bit codes (stochastically rounded, so
grad_γ stays unbiased) and 1/σ per row, and its backward runs torch's own backward kernel on the
decoded x̂ with μ = 0, σ = 1, then scales grad_x by each row's 1/σ. At 4 bits the saved map is 1/8
of an fp32 x plus 1/σ (one value per row) and the groups' statistics.

Under autocast the ops follow torch's norms: on CUDA (autocast's fp32 list) x, γ and β are cast to
fp32 and so is y; on the CPU nothing is cast and y takes x's dtype (ops/autocast.py). x̂ and 1/σ
are computed in fp32 (float64 for float64) and the gradient is rounded once to x's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from facto_fx.ops.grads import records_gradient, register_autograd
from facto_fx.ops.lossy import cast
from facto_fx.ops.quantized import (
    DEFAULT_BITS,
    DEFAULT_GROUP,
    check_bits,
    check_group,
    decode,
    draw_seed,
    quantize_parts,
    stats_dtype,
)
from facto_fx.shapes import is_channels_last
from facto_fx.triton_ops.dispatch import current_mode


def _per_channel(stat: Tensor, x: Tensor, groups: int) -> Tensor:
    """A (N, groups) statistic repeated over each group's channels, shaped to broadcast over x."""
    per_channel = stat.repeat_interleave(x.shape[1] // groups, dim=1)
    return per_channel.view(*per_channel.shape, *([1] * (x.dim() - 2)))


# -- layer norm ---------------------------------------------------------------------------------------


@torch.library.custom_op("facto::quantized_layer_norm", mutates_args=())
def quantized_layer_norm_fwd(
    x: Tensor, normalized_shape: list[int], weight: Tensor | None, bias: Tensor | None, eps: float, bits: int,
    group: int, seed: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _layer_norm_forward(x, normalized_shape, weight, bias, eps, check_bits(bits), check_group(group), seed)


def _layer_norm_forward(x, normalized_shape, weight, bias, eps, bits, group, seed):
    """(y, codes, mins, scales of x̂, 1/σ per row); on fake tensors, the fake kernel."""
    y, mean, rstd = torch.ops.aten.native_layer_norm(x, normalized_shape, weight, bias, eps)
    stats = stats_dtype(x.dtype)
    mean, rstd = mean.to(stats), rstd.to(stats)  # aten's fake gives them x's dtype, its CPU kernel fp32
    x_hat = (x.to(stats) - mean) * rstd
    return (y, *quantize_parts(x_hat, bits, group, seed), rstd)


quantized_layer_norm_fwd.register_fake(_layer_norm_forward)


def _setup_context(ctx, inputs, output):
    x, shape_or_groups, weight, bias, _, bits, group, _ = inputs
    ctx.save_for_backward(*output[1:], weight, bias)
    ctx.x_shape, ctx.x_dtype, ctx.channels_last = tuple(x.shape), x.dtype, is_channels_last(x)
    ctx.shape_or_groups = shape_or_groups
    ctx.bits, ctx.group = bits, group
    ctx.kernels = current_mode()
    ctx.mark_non_differentiable(*output[1:])


def _decoded(ctx, codes: Tensor, mins: Tensor, scales: Tensor) -> Tensor:
    return decode(codes, mins, scales, ctx.bits, ctx.group, ctx.x_shape, ctx.channels_last, mins.dtype, ctx.kernels)


def _grads(ctx, grads: tuple[Tensor | None, ...], weight: Tensor | None, bias: Tensor | None) -> tuple:
    grad_x, grad_w, grad_b = grads
    return (
        None if grad_x is None else grad_x.to(ctx.x_dtype),
        None,  # normalized_shape or num_groups
        None if grad_w is None else grad_w.to(weight.dtype),
        None if grad_b is None else grad_b.to(bias.dtype),
        None, None, None, None,
    )


def _layer_norm_backward(ctx, grad_y, *_grad_saved):
    codes, mins, scales, rstd, weight, bias = ctx.saved_tensors
    need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
    x_hat = _decoded(ctx, codes, mins, scales)
    acc = x_hat.dtype
    grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
        grad_y.to(acc), x_hat, ctx.shape_or_groups, torch.zeros_like(rstd), torch.ones_like(rstd),
        None if weight is None else cast(weight, acc), None if bias is None else cast(bias, acc),
        [need_x, need_w and weight is not None, need_b and bias is not None],
    )
    if grad_x is not None:
        grad_x = grad_x.mul_(rstd)
    return _grads(ctx, (grad_x, grad_w, grad_b), weight, bias)


register_autograd(quantized_layer_norm_fwd, _layer_norm_backward, _setup_context)


def quantized_layer_norm(
    x: Tensor, normalized_shape: int | list[int] | tuple[int, ...], weight: Tensor | None = None,
    bias: Tensor | None = None, eps: float = 1e-5, bits: int = DEFAULT_BITS, group: int = DEFAULT_GROUP,
) -> Tensor:
    """F.layer_norm whose backward keeps x̂ in `bits` bits per element and 1/σ per row. Without a
    gradient to compute, this is F.layer_norm."""
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    if not records_gradient(x, weight, bias):
        return torch.nn.functional.layer_norm(x, shape, weight, bias, eps)
    return torch.ops.facto.quantized_layer_norm(x, shape, weight, bias, eps, bits, group, draw_seed(x.device))[0]


# -- group norm ---------------------------------------------------------------------------------------


@torch.library.custom_op("facto::quantized_group_norm", mutates_args=())
def quantized_group_norm_fwd(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float, bits: int, group: int,
    seed: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _group_norm_forward(x, num_groups, weight, bias, eps, check_bits(bits), check_group(group), seed)


def _group_norm_forward(x, num_groups, weight, bias, eps, bits, group, seed):
    """(y, codes, mins, scales of x̂, 1/σ per (sample, group)); on fake tensors, the fake kernel."""
    n, c = x.shape[:2]
    y, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, n, c, math.prod(x.shape[2:]), num_groups, eps)
    # channels_last in, channels_last out, as the CPU kernel returns it (aten's fake says contiguous)
    y = y.contiguous(memory_format=torch.channels_last if is_channels_last(x) else torch.contiguous_format)
    stats = stats_dtype(x.dtype)
    mean, rstd = mean.to(stats), rstd.to(stats)
    x_hat = (x.to(stats) - _per_channel(mean, x, num_groups)) * _per_channel(rstd, x, num_groups)
    return (y, *quantize_parts(x_hat, bits, group, seed), rstd)


quantized_group_norm_fwd.register_fake(_group_norm_forward)


def _group_norm_backward(ctx, grad_y, *_grad_saved):
    codes, mins, scales, rstd, weight, bias = ctx.saved_tensors
    need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
    x_hat = _decoded(ctx, codes, mins, scales)
    acc, groups = x_hat.dtype, ctx.shape_or_groups
    n, c = x_hat.shape[:2]
    grad_x, grad_w, grad_b = torch.ops.aten.native_group_norm_backward(
        grad_y.to(acc), x_hat, torch.zeros_like(rstd), torch.ones_like(rstd),
        None if weight is None else cast(weight, acc), n, c, math.prod(x_hat.shape[2:]), groups,
        [need_x, need_w and weight is not None, need_b and bias is not None],
    )
    if grad_x is not None:
        grad_x = grad_x.mul_(_per_channel(rstd, grad_x, groups))
    return _grads(ctx, (grad_x, grad_w, grad_b), weight, bias)


register_autograd(quantized_group_norm_fwd, _group_norm_backward, _setup_context)


def quantized_group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5,
    bits: int = DEFAULT_BITS, group: int = DEFAULT_GROUP,
) -> Tensor:
    """F.group_norm whose backward keeps x̂ in `bits` bits per element and 1/σ per (sample, group).
    Without a gradient to compute, this is F.group_norm."""
    if not records_gradient(x, weight, bias):
        return torch.nn.functional.group_norm(x, num_groups, weight, bias, eps)
    if x.dim() < 2 or x.shape[1] % num_groups:
        raise ValueError(f"group norm: {x.shape[1] if x.dim() > 1 else 'no'} channels in {num_groups} groups; "
                         "the channels must divide evenly (as F.group_norm requires)")
    return torch.ops.facto.quantized_group_norm(x, num_groups, weight, bias, eps, bits, group,
                                                draw_seed(x.device))[0]
