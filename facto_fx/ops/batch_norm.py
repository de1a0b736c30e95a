"""Batch-norm whose saved map is x̂ mean-pooled, in two forms.

facto::batch_norm — frozen statistics: y = x̂·γ + β with x̂ = (x − μ)/σ fixed per channel.
grad_x needs no saved map at all; grad_γ needs x̂, which is saved mean-pooled (and only when γ is
trained).

facto::batch_norm_stats — batch statistics, as torch trains batch-norm: the forward is exact and
the running statistics update once per call. Its backward,
grad_x = γ/σ · (g − mean(g) − x̂·mean(g·x̂)), reads x̂ from the same pooled copy, upsampled: the
gradient through the statistics is what keeps a batch-norm network stable at a high learning rate
(frozen statistics diverged where this did not; benchmarks/switch_regimes.py), at the saved bytes
of frozen statistics. There is no Triton kernel of its own: it runs PyTorch on every device.

Both keep the pooled x̂ in `storage_dtype`, or, given `bits`, as the fixed-rate store's codes
(ops/quantized.py: `bits` per element, a min and a scale per `group` elements, stochastically
rounded: γ's gradient, linear in x̂, stays unbiased given the pooled map; the statistics' term of
grad_x, x̂·mean(g·x̂), is a product of two decoded values and nearly so).
x̂ is normalised, so its groups span a narrow range: at 4 bits an fp32 map keeps 1/32 of its size
(pooled 2×2) where the pooled map alone is 1/4. The codes follow the pooled map's logical (NCHW)
order whatever x's layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from facto_fx.ops.chunks import row_pieces
from facto_fx.ops.grads import records_gradient, register_autograd
from facto_fx.ops.lossy import cast, mean_pool, store, sum_pool, upsample
from facto_fx.ops.quantized import (
    DEFAULT_GROUP,
    check_bits,
    check_group,
    decode,
    draw_seed,
    quantize_parts,
    stats_dtype,
)
from facto_fx.ops.scale import pooled_shape, spatial_kernel
from facto_fx.shapes import is_channels_last
from facto_fx.triton_ops.dispatch import current_mode, use_triton


def _keep(pooled_hat: Tensor, storage_dtype: torch.dtype | None, bits: int | None, group: int,
          seed: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """What backward keeps of the pooled x̂: (the map in `storage_dtype`, two empty tensors), or
    with `bits` its fixed-rate (codes, mins, scales)."""
    if bits is None:
        return _uncoded(store(pooled_hat, storage_dtype))
    if seed is None:
        raise ValueError(f"batch-norm's x̂ in {bits}-bit codes needs a seed (facto_fx.ops.quantized.draw_seed)")
    return quantize_parts(pooled_hat.contiguous(), check_bits(bits), check_group(group), seed)


def _uncoded(kept: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`kept` and the two (empty) statistics of codes it does not have."""
    stats = stats_dtype(kept.dtype)
    return kept, kept.new_empty(0, dtype=stats), kept.new_empty(0, dtype=stats)


def _remember_codes(ctx, x: Tensor, lossy_kernel: int, bits: int | None, group: int) -> None:
    ctx.bits, ctx.group, ctx.x_dtype = bits, group, x.dtype
    ctx.pooled_shape = pooled_shape(x, lossy_kernel)
    ctx.kernels = current_mode()


def _pooled_x_hat(ctx, kept: Tensor, mins: Tensor, scales: Tensor) -> Tensor:
    """The pooled x̂ backward reads: the kept map, or its codes decoded (in x's dtype)."""
    if ctx.bits is None or kept.numel() == 0:
        return kept
    return decode(kept, mins, scales, ctx.bits, ctx.group, ctx.pooled_shape, False, ctx.x_dtype, ctx.kernels)


@torch.library.custom_op("facto::batch_norm", mutates_args=())
def batch_norm_fwd(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    lossy_kernel: int,
    storage_dtype: torch.dtype | None,
    save_pooled: bool,
    bits: int | None,
    group: int,
    seed: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if use_triton(x):
        from facto_fx.triton_ops.affine import affine_forward

        rstd = torch.rsqrt(running_var + eps)
        y, pooled_hat = affine_forward(
            x, x.shape[1], lossy_kernel, storage_dtype if bits is None else None, save_pooled, running_mean, rstd,
            weight, bias,
        )
        return y, *(_keep(pooled_hat, None, bits, group, seed) if save_pooled else _uncoded(pooled_hat))
    return _forward(x, weight, bias, running_mean, running_var, eps, lossy_kernel, storage_dtype, save_pooled, bits,
                    group, seed)


def _forward(x, weight, bias, running_mean, running_var, eps, lossy_kernel, storage_dtype, save_pooled, bits, group,
             seed):
    """The PyTorch path; on fake tensors, the fake kernel.

    Both y and the pooled x̂ = (meanpool_k(x) − μ)/σ (pooling commutes with the per-channel
    affine) come from torch's own inference batch-norm: one aten call each, computed in the
    statistics' precision and returned in x's dtype, and no full-size temporary besides y.
    """
    y = F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    if not save_pooled:
        return y, *_uncoded(x.new_empty(0))
    pooled = mean_pool(x, spatial_kernel(x, lossy_kernel))
    pooled_hat = F.batch_norm(pooled, running_mean, running_var, None, None, False, 0.0, eps)
    return y, *_keep(pooled_hat, storage_dtype, bits, group, seed)


batch_norm_fwd.register_fake(_forward)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, running_var, eps, lossy_kernel, _, _, bits, group, _ = inputs
    ctx.save_for_backward(*output[1:], weight, running_var)
    ctx.eps = eps
    ctx.has_bias = bias is not None
    ctx.lossy_kernel = lossy_kernel
    _remember_codes(ctx, x, lossy_kernel, bits, group)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_y, *_grad_kept):
    kept, mins, scales, weight, running_var = ctx.saved_tensors
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_weight, need_bias = need_weight and weight is not None, need_bias and ctx.has_bias
    if need_weight and kept.numel() == 0:
        raise RuntimeError("facto::batch_norm ran with save_pooled=False, so no map was kept for γ's gradient")
    pooled = _pooled_x_hat(ctx, kept, mins, scales) if need_weight else kept  # only γ's gradient reads x̂
    if use_triton(grad_y, ctx.kernels):
        from facto_fx.triton_ops.affine import affine_backward

        gain = torch.rsqrt(running_var + ctx.eps)
        if weight is not None:
            gain = gain * weight

        needs = (need_x, need_weight, need_bias)
        grads = affine_backward(grad_y, pooled, gain, grad_y.shape[1], ctx.lossy_kernel, needs)
        return *grads, None, None, None, None, None, None, None, None, None
    grad_x = grad_weight = grad_bias = None
    reduce_dims = [d for d in range(grad_y.dim()) if d != 1]
    # The small reductions first, so their pooled temporaries are gone before grad_x is allocated.
    if need_weight:
        grad_p = sum_pool(grad_y, spatial_kernel(grad_y, ctx.lossy_kernel))
        grad_weight = (grad_p * cast(pooled, grad_p.dtype)).sum(reduce_dims)
        del grad_p
    if need_bias:
        grad_bias = grad_y.sum(reduce_dims)
    if need_x:  # grad_y·γ/σ is an inference batch-norm of grad_y with zero mean and no shift
        zero_mean = running_var.new_zeros(running_var.shape)
        grad_x = F.batch_norm(grad_y, zero_mean, running_var, weight, None, False, 0.0, ctx.eps)
    return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None, None, None


register_autograd(batch_norm_fwd, _backward, _setup_context)


def batch_norm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    lossy_kernel: int = 2,
    storage_dtype: torch.dtype | None = None,
    bits: int | None = None,
    group: int = DEFAULT_GROUP,
) -> Tensor:
    """Frozen-statistics batch-norm over dim 1; saves pooled x̂ (in `bits`-bit codes, given them)
    only if `weight` is trained."""
    if not records_gradient(x, weight, bias):
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    save_pooled = weight is not None and weight.requires_grad
    seed = draw_seed(x.device) if bits is not None and save_pooled else None
    return torch.ops.facto.batch_norm(
        x, weight, bias, running_mean, running_var, eps, lossy_kernel, storage_dtype, save_pooled, bits, group, seed
    )[0]


@torch.library.custom_op("facto::batch_norm_stats", mutates_args=())
def batch_norm_stats_fwd(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    lossy_kernel: int,
    storage_dtype: torch.dtype | None,
    bits: int | None,
    group: int,
    seed: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _stats_forward(x, weight, bias, eps, lossy_kernel, storage_dtype, bits, group, seed)


def _per_channel(t: Tensor, like: Tensor) -> Tensor:
    """A (C,) vector shaped to broadcast over dim 1 of `like`."""
    return t.view(1, -1, *([1] * (like.dim() - 2)))


def _minus_upsampled(grad_y: Tensor, gain: Tensor, shift: Tensor, k: int) -> Tensor:
    """grad_y·gain − upsample_k(shift): `gain` per channel, `shift` a term per pooled element.

    Where k tiles an NCHW map, piece by piece over its (sample, channel) planes (ops/chunks.py), each
    piece's shift upsampled along the rows in cache and subtracted over the k rows of each block:
    9 ms on an 8×96×80×80 map here, where broadcasting over the k×k block view (a size-k innermost
    dim) took 10-14 ms and the three passes before this, 32. A channels_last map subtracts on its
    block view, whose innermost dim is the channels. Neither allocates more than the gradient and a
    piece; a map k does not tile goes through the upsampled shift.
    """
    if k == 1:  # (shift has the decoded map's NCHW order: subtracting it keeps grad_y's layout)
        return (grad_y * gain).sub_(shift)
    n, c, h, w = grad_y.shape
    if h % k or w % k:
        return (grad_y * gain).sub_(upsample(shift, k, (h, w)))
    if is_channels_last(grad_y) or not grad_y.is_contiguous():
        grad_x = grad_y * gain
        blocks = grad_x.unflatten(-1, (w // k, k)).unflatten(-3, (h // k, k))  # N, C, h/k, k, w/k, k
        blocks.sub_(shift[:, :, :, None, :, None])
        return grad_x
    grad_x = torch.empty_like(grad_y)
    rows_y, rows_x = grad_y.view(n * c, h // k, k, w), grad_x.view(n * c, h // k, k, w)
    rows_shift, rows_gain = shift.reshape(n * c, h // k, w // k), gain.reshape(c).repeat(n)
    for rows in row_pieces(n * c, h * w, grad_y.device):
        torch.mul(rows_y[rows], rows_gain[rows, None, None, None], out=rows_x[rows])
        rows_x[rows].sub_(rows_shift[rows].repeat_interleave(k, -1)[:, :, None, :])
    return grad_x


def _stats_forward(x, weight, bias, eps, lossy_kernel, storage_dtype, bits, group, seed):
    """(y, the pooled x̂ as _keep keeps it (three tensors), μ, 1/σ): torch's training batch-norm
    (one aten call, statistics in fp32 for every x dtype), then x̂ of the pooled map (pooling
    commutes with the per-channel affine). Also the fake kernel."""
    y, mean, invstd = torch.ops.aten.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
    pooled = mean_pool(x, spatial_kernel(x, lossy_kernel))
    pooled_hat = ((pooled - _per_channel(mean, x)) * _per_channel(invstd, x)).to(x.dtype)
    # aten's fake gives the statistics x's dtype where the CPU kernel gives fp32: fix the dtype.
    acc = torch.promote_types(x.dtype, torch.float32)
    return y, *_keep(pooled_hat, storage_dtype, bits, group, seed), mean.to(acc), invstd.to(acc)


batch_norm_stats_fwd.register_fake(_stats_forward)


def _stats_setup_context(ctx, inputs, output):
    x, weight, bias, _, lossy_kernel, _, bits, group, _ = inputs
    ctx.save_for_backward(*output[1:4], weight, output[5])
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.lossy_kernel = lossy_kernel
    _remember_codes(ctx, x, lossy_kernel, bits, group)
    ctx.mark_non_differentiable(*output[1:])


def _stats_backward(ctx, grad_y, *_grad_saved):
    """torch's batch-norm backward with x̂ upsampled from its pooled copy; per-channel sums in at least fp32."""
    kept, mins, scales, weight, invstd = ctx.saved_tensors
    pooled = _pooled_x_hat(ctx, kept, mins, scales)
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    reduce_dims = [d for d in range(grad_y.dim()) if d != 1]
    count = grad_y.numel() // grad_y.shape[1]
    k = spatial_kernel(grad_y, ctx.lossy_kernel)
    acc = torch.promote_types(grad_y.dtype, torch.float32)
    grad_p = sum_pool(grad_y, k)
    # Σ grad_y from its window sums (a quarter of the reads at k = 2) where they are in fp32 or wider
    grad_bias = (grad_p if grad_p.dtype == acc else grad_y).sum(reduce_dims, dtype=acc)
    grad_weight = (grad_p * cast(pooled, grad_p.dtype)).sum(reduce_dims, dtype=acc)
    del grad_p
    grad_x = None
    if need_x:  # grad_y·gain − (gain·mean(grad_y) + x̂·gain·mean(grad_y·x̂)), x̂ upsampled from its pooled map
        gain = invstd if weight is None else invstd * weight.to(acc)
        shift = torch.addcmul(_per_channel(gain * grad_bias / count, pooled), pooled.to(acc),
                              _per_channel(gain * grad_weight / count, pooled)).to(grad_y.dtype)
        del pooled  # the decoded map is done with before grad_x is allocated (the backward's peak)
        grad_x = _minus_upsampled(grad_y, _per_channel(gain, grad_y).to(grad_y.dtype), shift, k)
    grad_weight = grad_weight.to(weight.dtype) if need_weight and weight is not None else None
    grad_bias = grad_bias.to(ctx.bias_dtype) if need_bias and ctx.bias_dtype is not None else None
    return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


register_autograd(batch_norm_stats_fwd, _stats_backward, _stats_setup_context)


def batch_norm_stats(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    lossy_kernel: int = 2,
    storage_dtype: torch.dtype | None = None,
    bits: int | None = None,
    group: int = DEFAULT_GROUP,
) -> Tensor:
    """Batch-norm on batch statistics over dim 1, updating the running statistics as
    F.batch_norm(training=True) does (unbiased variance, `momentum`); saves only pooled x̂ (in
    `bits`-bit codes, given them)."""
    if not records_gradient(x, weight, bias):
        return F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    count = x.numel() // x.shape[1]
    if count < 2:
        raise ValueError(
            f"batch-norm on batch statistics needs more than 1 value per channel; got input {tuple(x.shape)}"
        )
    seed = None if bits is None else draw_seed(x.device)
    y, *_, mean, invstd = torch.ops.facto.batch_norm_stats(x, weight, bias, eps, lossy_kernel, storage_dtype, bits,
                                                          group, seed)
    with torch.no_grad():
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_(((invstd.pow(-2) - eps) * (count / (count - 1))).to(running_var.dtype), momentum)
    return y


def batch_norm_in_mode(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    lossy_kernel: int = 2,
    storage_dtype: torch.dtype | None = None,
    bits: int | None = None,
    group: int = DEFAULT_GROUP,
) -> Tensor:
    """What F.batch_norm(..., training, momentum, eps) computes, saving x̂ pooled: batch statistics
    in training (batch_norm_stats), running statistics otherwise (batch_norm). A functional
    batch-norm reads its module's mode at run time, so one graph serves both."""
    codes = {"lossy_kernel": lossy_kernel, "storage_dtype": storage_dtype, "bits": bits, "group": group}
    if training:
        return batch_norm_stats(x, running_mean, running_var, weight, bias, momentum, eps, **codes)
    return batch_norm(x, running_mean, running_var, weight, bias, eps, **codes)
