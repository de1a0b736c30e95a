"""Dropout: forward turns uniform draws into the scaled output and the packed keep-mask in one
pass; backward unpacks the mask and applies it with the same 1/(1-p) scale.

The draws come from torch.rand_like(x) in fp32, so a seeded run keeps exactly the elements that
facto::dropout's PyTorch path keeps. Both kernels walk the map in memory order: a channels_last
map is not copied, and its mask comes out in (N, H, W, C) order, as ops/bitpack.py packs it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from facto_fx.shapes import packed_numel
from facto_fx.triton_ops.bitpack import load_codes, store_packed
from facto_fx.triton_ops.layout import in_layout, kernel_layout

BLOCK = 1024


@triton.jit
def _dropout_fwd_kernel(x_ptr, u_ptr, y_ptr, mask_ptr, threshold, scale, n, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offsets = start + tl.arange(0, BLOCK)
    in_bounds = offsets < n
    x = tl.load(x_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    keep = u >= threshold
    tl.store(y_ptr + offsets, tl.where(keep, x / scale, 0.0).to(y_ptr.dtype.element_ty), mask=in_bounds)
    store_packed(mask_ptr, keep, start, n, BLOCK, 1)


@triton.jit
def _dropout_bwd_kernel(grad_y_ptr, mask_ptr, grad_x_ptr, scale, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < n
    grad = tl.load(grad_y_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    keep = load_codes(mask_ptr, offsets, in_bounds, 1)
    grad_x = tl.where(keep != 0, grad / scale, 0.0)
    tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=in_bounds)


def dropout_forward(x: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """(x · keep / (1 - p), pack_bits(keep, 1, is_channels_last(x))) with keep = (fp32 uniforms) >= p.

    The uniforms are fp32 whatever x's dtype: 16-bit draws sit on a coarse grid and bias the keep
    rate (bf16 kept 0.898 of the elements at p = 0.1). They are drawn for x as given, before any
    copy, so that they land where the PyTorch path's do.
    """
    u = torch.rand_like(x, dtype=torch.float32)
    x, channels_last = kernel_layout(x)
    u = in_layout(u, channels_last)
    y = torch.empty_like(x)
    mask = torch.empty(packed_numel(x.numel(), 1), dtype=torch.uint8, device=x.device)
    if x.numel():
        grid = (triton.cdiv(x.numel(), BLOCK),)
        _dropout_fwd_kernel[grid](x, u, y, mask, p, 1.0 - p, x.numel(), BLOCK=BLOCK)
    return y, mask


def dropout_backward(grad_y: Tensor, mask: Tensor, p: float, channels_last: bool = False) -> Tensor:
    """grad_y · keep / (1 - p), keep read from the packed mask; channels_last says the mask's order."""
    grad_y = in_layout(grad_y, channels_last)
    grad_x = torch.empty_like(grad_y)
    if grad_y.numel():
        grid = (triton.cdiv(grad_y.numel(), BLOCK),)
        _dropout_bwd_kernel[grid](grad_y, mask, grad_x, 1.0 - p, grad_y.numel(), BLOCK=BLOCK)
    return grad_x
