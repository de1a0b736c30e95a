"""ReLU: forward writes y and the bit-packed mask in one pass; backward unpacks and applies it.

Both walk the map in memory order, so a channels_last map is neither copied nor reordered and its
mask comes out in (N, H, W, C) order, as ops/bitpack.py packs it.
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
def _relu_fwd_kernel(x_ptr, y_ptr, mask_ptr, n, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offsets = start + tl.arange(0, BLOCK)
    in_bounds = offsets < n
    x = tl.load(x_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    positive = x > 0
    y = tl.where(x < 0, 0.0, x)  # keeps NaN, as torch.relu does
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=in_bounds)
    store_packed(mask_ptr, positive, start, n, BLOCK, 1)


@triton.jit
def _relu_bwd_kernel(grad_y_ptr, mask_ptr, grad_x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < n
    grad = tl.load(grad_y_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    keep = load_codes(mask_ptr, offsets, in_bounds, 1)
    grad_x = tl.where(keep != 0, grad, 0.0)  # 0 where masked, even for an inf gradient (as torch)
    tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=in_bounds)


def relu_forward(x: Tensor) -> tuple[Tensor, Tensor]:
    """(relu(x), pack_bits(x > 0, 1, is_channels_last(x))); y is channels_last if x is, else contiguous."""
    x, _ = kernel_layout(x)
    y = torch.empty_like(x)
    mask = torch.empty(packed_numel(x.numel(), 1), dtype=torch.uint8, device=x.device)
    if x.numel():
        _relu_fwd_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, y, mask, x.numel(), BLOCK=BLOCK)
    return y, mask


def relu_backward(grad_y: Tensor, mask: Tensor, channels_last: bool = False) -> Tensor:
    """grad_y where the packed mask is set, else 0; channels_last says the order the mask is in."""
    grad_y = in_layout(grad_y, channels_last)
    grad_x = torch.empty_like(grad_y)
    if grad_y.numel():
        _relu_bwd_kernel[(triton.cdiv(grad_y.numel(), BLOCK),)](grad_y, mask, grad_x, grad_y.numel(), BLOCK=BLOCK)
    return grad_x
