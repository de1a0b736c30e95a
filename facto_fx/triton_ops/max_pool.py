"""Max-pool: forward writes y and the packed argmax-in-window code in one pass; backward rebuilds
grad_x by gathering, for each input element, the gradients of the windows whose argmax it is.

The gather needs no atomics and no zero-fill, covers overlapping windows (3×3/2), padding,
dilation and ceil mode alike, and sums in a fixed order, so it is deterministic.

Both kernels walk their output in memory order, NCHW or channels_last (triton_ops/layout.py): a
channels_last map is read where it lies, y and grad_x keep its layout, and the codes come out in
y's memory order, as ops/bitpack.py packs them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from facto_fx.shapes import code_bits, packed_numel, pool_output_size
from facto_fx.triton_ops.bitpack import load_codes, store_packed
from facto_fx.triton_ops.layout import in_layout, kernel_layout, memory_format, offset, position

BLOCK = 512


@triton.jit
def _max_pool_fwd_kernel(
    x_ptr, y_ptr, code_ptr, numel, C, H, W, OH, OW,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    BITS: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offsets = start + tl.arange(0, BLOCK)  # memory offset of the output element
    in_bounds = offsets < numel
    n, c, oh, ow = position(offsets, C, OH, OW, CHANNELS_LAST)
    best = tl.full((BLOCK,), float("-inf"), tl.float32)
    code = tl.zeros((BLOCK,), tl.int32)
    for i in tl.static_range(KH):
        h = oh * SH - PH + i * DH
        for j in tl.static_range(KW):
            w = ow * SW - PW + j * DW
            inside = in_bounds & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            x_offset = offset(n, c, h, w, C, H, W, CHANNELS_LAST)
            v = tl.load(x_ptr + x_offset, mask=inside, other=float("-inf")).to(tl.float32)
            better = inside & ((v > best) | (v != v))  # NaN wins, as in torch's max_pool2d
            best = tl.where(better, v, best)
            code = tl.where(better, i * KW + j, code)
    tl.store(y_ptr + offsets, best.to(y_ptr.dtype.element_ty), mask=in_bounds)
    store_packed(code_ptr, code, start, numel, BLOCK, BITS)


@triton.jit
def _max_pool_bwd_kernel(
    grad_y_ptr, code_ptr, grad_x_ptr, numel, C, H, W, OH, OW,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    BITS: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # memory offset of the input element
    in_bounds = offsets < numel
    n, c, h, w = position(offsets, C, H, W, CHANNELS_LAST)
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in tl.static_range(KH):
        # the window whose tap (i, j) lands on (h, w) starts at oh·SH - PH = h - i·DH
        th = h + PH - i * DH
        oh = th // SH
        for j in tl.static_range(KW):
            tw = w + PW - j * DW
            ow = tw // SW
            hit = in_bounds & (th >= 0) & (th % SH == 0) & (oh < OH) & (tw >= 0) & (tw % SW == 0) & (ow < OW)
            out = offset(n, c, oh, ow, C, OH, OW, CHANNELS_LAST)  # of grad_y and of the code
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
    """(F.max_pool2d(x, ...), packed code) with code = local_h · kw + local_w of each argmax.

    y is channels_last if x is (else contiguous), and the codes are in y's memory order.
    """
    x, channels_last = kernel_layout(x)
    channels, height, width = x.shape[-3:]
    oh, ow = (
        pool_output_size(x.shape[-2 + i], kernel_size[i], stride[i], padding[i], dilation[i], ceil_mode)
        for i in range(2)
    )
    geometry = _geometry(kernel_size, stride, padding, dilation)
    y = torch.empty(
        (*x.shape[:-2], oh, ow), dtype=x.dtype, device=x.device, memory_format=memory_format(channels_last)
    )
    code = torch.empty(packed_numel(y.numel(), geometry["BITS"]), dtype=torch.uint8, device=x.device)
    if y.numel():
        grid = (triton.cdiv(y.numel(), BLOCK),)
        _max_pool_fwd_kernel[grid](
            x, y, code, y.numel(), channels, height, width, oh, ow, **geometry, CHANNELS_LAST=channels_last,
            BLOCK=BLOCK,
        )
    return y, code


def max_pool_backward(
    grad_y: Tensor, code: Tensor, x_shape, kernel_size: list[int], stride: list[int], padding: list[int],
    dilation: list[int], channels_last: bool = False,
) -> Tensor:
    """grad_x of max-pool: each window's gradient goes to the input element its code names.

    channels_last says the codes' order (x's layout in forward); grad_x takes that layout.
    """
    grad_y = in_layout(grad_y, channels_last)
    grad_x = torch.empty(x_shape, dtype=grad_y.dtype, device=grad_y.device, memory_format=memory_format(channels_last))
    if grad_x.numel():
        grid = (triton.cdiv(grad_x.numel(), BLOCK),)
        _max_pool_bwd_kernel[grid](
            grad_y, code, grad_x, grad_x.numel(), *x_shape[-3:], *grad_y.shape[-2:],
            **_geometry(kernel_size, stride, padding, dilation), CHANNELS_LAST=channels_last, BLOCK=BLOCK,
        )
    return grad_x
