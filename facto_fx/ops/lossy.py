"""Lossy compression by mean-pooling (paper §3.3), and the pooled projection Z_p of the conv.

Pools use ceil mode: a window that hangs over the bottom / right edge averages the values it
covers, so no row of the feature map is dropped from the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from facto_fx.shapes import conv_output_size


def _strided_sum_pays(x: Tensor, k: int) -> bool:
    """CPU maps that tile by k: there avg_pool2d's NCHW kernel is about ten times slower than
    strided adds (0.32 vs 3.6 ms for 8×64×64×64). On a GPU avg_pool2d is one fast kernel, where
    the adds would be 2(k − 1) launches."""
    return x.device.type == "cpu" and x.shape[-2] % k == 0 and x.shape[-1] % k == 0


def _window_sum(x: Tensor, k: int) -> Tensor:
    """Sum over k×k tiles as k − 1 strided adds per axis."""
    rows = x[..., 0::k, :] + x[..., 1::k, :]
    for i in range(2, k):
        rows.add_(x[..., i::k, :])
    out = rows[..., 0::k] + rows[..., 1::k]
    for j in range(2, k):
        out.add_(rows[..., j::k])
    return out


def mean_pool(x: Tensor, k: int) -> Tensor:
    """meanpool_k over the last two dims (identity for k = 1)."""
    if k == 1:
        return x
    if _strided_sum_pays(x, k):
        return _window_sum(x, k).mul_(1.0 / (k * k))
    return F.avg_pool2d(x, k, k, ceil_mode=True)


def sum_pool(x: Tensor, k: int) -> Tensor:
    """sumpool_k over the last two dims: the adjoint of nearest upsampling."""
    if k == 1:
        return x
    if _strided_sum_pays(x, k):
        return _window_sum(x, k)
    return F.avg_pool2d(x, k, k, ceil_mode=True, divisor_override=1)


def upsample(pooled: Tensor, k: int, size: tuple[int, int]) -> Tensor:
    """Each pooled value repeated over its k×k window, cropped to `size`: the map mean_pool
    stands for (nearest upsampling, the adjoint of sum_pool)."""
    if k == 1:
        return pooled
    return pooled.repeat_interleave(k, -2).repeat_interleave(k, -1)[..., : size[0], : size[1]]


def _span(kernel: int, stride: int, dilation: int, k: int) -> int:
    return stride * (k - 1) + dilation * (kernel - 1) + 1


def _placement(kernel: int, stride: int, dilation: int, k: int, like: Tensor) -> Tensor:
    """(kernel, span) counts: how often tap i lands on position u over the k shifts of the pool."""
    taps = torch.arange(kernel, device=like.device) * dilation
    shifts = torch.arange(k, device=like.device) * stride
    span = _span(kernel, stride, dilation, k)
    return F.one_hot(taps[:, None] + shifts[None, :], span).sum(1).to(like.dtype)


def folds(kernel_size: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int], k: int) -> bool:
    """Whether folding the k×k pool into the filter costs fewer taps than the conv it replaces."""
    kh, kw = kernel_size
    if k == 1 or (kh, kw) == (1, 1):
        return False
    span = _span(kh, stride[0], dilation[0], k) * _span(kw, stride[1], dilation[1], k)
    return span < k * k * kh * kw


def pooled_filter(weight: Tensor, stride: tuple[int, int], dilation: tuple[int, int], k: int) -> Tensor:
    """The single filter E with conv(x, E, stride * k) == meanpool_k(conv(x, weight, stride)).

    E is the (dilated) filter summed over the k×k shifts of the pooling window, divided by k²: one
    matmul of the flattened taps with a placement matrix, the Kronecker product of the row and
    column placements. It depends on the filter alone, so a layer forms it once per draw of D.
    """
    c_out, c_in, kh, kw = weight.shape
    rows = _placement(kh, stride[0], dilation[0], k, weight)
    cols = _placement(kw, stride[1], dilation[1], k, weight)
    fused = weight.reshape(-1, kh * kw) @ (torch.kron(rows, cols) / (k * k))
    return fused.view(c_out, c_in, rows.shape[1], cols.shape[1])


def pooled_projection(
    x: Tensor,
    weight: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    k: int,
    folded: Tensor | None = None,
) -> Tensor:
    """Z_p = meanpool_k(conv2d(x, weight)) without materialising the full-size conv output.

    A 1×1, stride-1, unpadded projection commutes with the pool, so x is pooled first (k² less
    work). Otherwise, when the conv output tiles evenly by k and `folds`, the pool is folded into
    the filter (docs/design.md §1; `folded` is that filter, formed here if not given); else conv then pool.
    """
    kh, kw = weight.shape[2:]
    if (kh, kw) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0):
        return F.conv2d(mean_pool(x, k), weight)
    z_h = conv_output_size(x.shape[-2], kh, stride[0], padding[0], dilation[0])
    z_w = conv_output_size(x.shape[-1], kw, stride[1], padding[1], dilation[1])
    if z_h % k == 0 and z_w % k == 0 and folds((kh, kw), stride, dilation, k):
        fused = pooled_filter(weight, stride, dilation, k) if folded is None else folded
        return F.conv2d(x, fused, None, (stride[0] * k, stride[1] * k), padding)
    return mean_pool(F.conv2d(x, weight, None, stride, padding, dilation), k)


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in `dtype`, without an aten call when it already is (the hot path counts its calls)."""
    return t if t.dtype == dtype else t.to(dtype)


def store(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    """Cast a compressed map to its storage dtype (None keeps it)."""
    return x if dtype is None else cast(x, dtype)


def compress(x: Tensor, k: int, dtype: torch.dtype | None) -> Tensor:
    """store(mean_pool(x, k), dtype) in storage of its own: a custom op's outputs may not alias."""
    pooled = store(mean_pool(x, k), dtype)
    return pooled.clone() if pooled is x else pooled
