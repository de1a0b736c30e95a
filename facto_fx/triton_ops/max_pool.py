"""Max-pool: forward writes y and the packed argmax-in-window code in one pass; backward rebuilds
grad_x by gathering, for each input element, the gradients of the windows whose argmax it is.

The gather needs no atomics and no zero-fill, covers overlapping windows (3×3/2), padding,
dilation and ceil mode alike, and sums in a fixed order, so it is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from facto_fx.ops.bitpack import code_bits, packed_numel
from facto_fx.ops.max_pool import pool_output_size
from facto_fx.triton_ops.bitpack import load_codes, store_packed

BLOCK = 512


@triton.jit
def _max_pool_fwd_kernel(
    x_ptr, y_ptr, code_ptr, n, H, W, OH, OW,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    BITS: tl.constexpr, BLOCK: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offsets = start + tl.arange(0, BLOCK)  # flat index of the output element
    in_bounds = offsets < n
    ow = offsets % OW
    oh = (offsets // OW) % OH
    plane = offsets // (OW * OH)
    best = tl.full((BLOCK,), float("-inf"), tl.float32)
    code = tl.zeros((BLOCK,), tl.int32)
    for i in tl.static_range(KH):
        h = oh * SH - PH + i * DH
        for j in tl.static_range(KW):
            w = ow * SW - PW + j * DW
            inside = in_bounds & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            v = tl.load(x_ptr + (plane * H + h) * W + w, mask=inside, other=float("-inf")).to(tl.float32)
            better = inside & ((v > best) | (v != v))  # NaN wins, as in torch's max_pool2d
            best = tl.where(better, v, best)
            code = tl.where(better, i * KW + j, code)
    tl.store(y_ptr + offsets, best.to(y_ptr.dtype.element_ty), mask=in_bounds)
    store_packed(code_ptr, code, start, n, BLOCK, BITS)


@triton.jit
def _max_pool_bwd_kernel(
    grad_y_ptr, code_ptr, grad_x_ptr, n, H, W, OH, OW,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    BITS: tl.constexpr, BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # flat index of the input element
    in_bounds = offsets < n
    w = offsets % W
    h = (offsets // W) % H
    plane = offsets // (W * H)
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in tl.static_range(KH):
        # the window whose tap (i, j) lands on (h, w) starts at oh·SH - PH = h - i·DH
        th = h + PH - i * DH
        oh = th // SH
        for j in tl.static_range(KW):
            tw = w + PW - j * DW
            ow = tw // SW
            hit = in_bounds & (th >= 0) & (th % SH == 0) & (oh < OH) & (tw >= 0) & (tw % SW == 0) & (ow < OW)
            out = (plane * OH + oh) * OW + ow
            chosen = hit & (load_codes(code_ptr, out, hit, BITS) == i * KW + j)
            acc += tl.load(grad_y_ptr + out, mask=chosen, other=0.0).to(tl.float32)
    tl.store(grad_x_ptr + offsets, acc.to(grad_x_ptr.dtype.element_ty), mask=in_bounds)


def _geometry(kernel_size, stride, padding, dilation) -> dict:
    return dict(
        KH=kernel_size[0], KW=kernel_size[1], SH=stride[0], SW=stride[1],
        PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1],
        BITS=code_bits(kernel_size[0] * kernel_size[1]),
    )


def max_pool_forward(
    x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int], ceil_mode: bool
) -> tuple[Tensor, Tensor]:
    """(F.max_pool2d(x, ...), packed code) with code = local_h · kw + local_w of each argmax."""
    x = x.contiguous()
    height, width = x.shape[-2:]
    oh, ow = (
        pool_output_size(x.shape[-2 + i], kernel_size[i], stride[i], padding[i], dilation[i], ceil_mode)
        for i in range(2)
    )
    geometry = _geometry(kernel_size, stride, padding, dilation)
    y = x.new_empty(*x.shape[:-2], oh, ow)
    code = torch.empty(packed_numel(y.numel(), geometry["BITS"]), dtype=torch.uint8, device=x.device)
    if y.numel():
        grid = (triton.cdiv(y.numel(), BLOCK),)
        _max_pool_fwd_kernel[grid](x, y, code, y.numel(), height, width, oh, ow, **geometry, BLOCK=BLOCK)
    return y, code


def max_pool_backward(
    grad_y: Tensor, code: Tensor, x_shape, kernel_size: list[int], stride: list[int], padding: list[int],
    dilation: list[int],
) -> Tensor:
    """grad_x of max-pool: each window's gradient goes to the input element its code names."""
    grad_y = grad_y.contiguous()
    grad_x = grad_y.new_empty(x_shape)
    if grad_x.numel():
        grid = (triton.cdiv(grad_x.numel(), BLOCK),)
        _max_pool_bwd_kernel[grid](
            grad_y, code, grad_x, grad_x.numel(), *x_shape[-2:], *grad_y.shape[-2:],
            **_geometry(kernel_size, stride, padding, dilation), BLOCK=BLOCK,
        )
    return grad_x
