"""facto::max_pool2d — max over each window, saving the argmax's position inside its window.

The code takes ceil(log2(kh·kw)) bits rounded to 1/2/4/8 bits per output element: 2 bits for a
2×2/2 pool (0.5 bit per input element), 4 bits for torchvision's 3×3/2 pool (1 bit per input).
Codes are packed in the output's memory order, which follows x's (ops/bitpack.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from facto_fx.ops.bitpack import pack_bits, unpack_codes
from facto_fx.ops.grads import records_gradient, register_autograd
from facto_fx.shapes import code_bits, is_channels_last, pair, pool_output_size
from facto_fx.triton_ops.dispatch import current_mode, use_triton


def _window_origin(size: int, stride: int, padding: int, device: torch.device) -> Tensor:
    return torch.arange(size, device=device) * stride - padding


def _tiles_exactly(x: Tensor, kernel_size, stride, padding, dilation) -> bool:
    return (
        list(kernel_size) == list(stride) and list(padding) == [0, 0] and list(dilation) == [1, 1]
        and x.shape[-2] % kernel_size[0] == 0 and x.shape[-1] % kernel_size[1] == 0
    )


def _tiled_max(x: Tensor, kh: int, kw: int) -> tuple[Tensor, Tensor]:
    """Non-overlapping windows: a pairwise max over the kh·kw strided views of x (no copy of x).

    Each merge keeps the left group's value and code unless the right one is strictly greater,
    and the left group holds the earlier taps, so ties go to the first, as in F.max_pool2d. Codes
    are blended arithmetically (a + wins·(b − a), wrapping in uint8): torch.where and masked_fill
    with a bool mask are an order of magnitude slower on the CPU.
    """
    taps: list[tuple[Tensor, Tensor | int]] = [(x[..., i::kh, j::kw], i * kw + j) for i in range(kh) for j in range(kw)]
    if len(taps) == 1:
        return taps[0][0].clone(), torch.zeros(taps[0][0].shape, dtype=torch.uint8, device=x.device)
    while len(taps) > 1:
        pairs = zip(taps[0::2], taps[1::2], strict=False)  # an odd last group waits for the next round
        merged = [_merge(left, right) for left, right in pairs]
        taps = merged + taps[len(merged) * 2 :]
    y, code = taps[0]
    return y, code


def _merge(left: tuple[Tensor, Tensor | int], right: tuple[Tensor, Tensor | int]) -> tuple[Tensor, Tensor]:
    (a, code_a), (b, code_b) = left, right
    wins = (b > a).view(torch.uint8)
    if isinstance(code_a, int) and (code_a, code_b) == (0, 1):  # the first two taps: the comparison itself
        code = wins
    else:
        code = wins * (code_b - code_a) + code_a
    return torch.maximum(a, b), code


def _argmax_positions(code: Tensor, x_shape: torch.Size, kernel_size, stride, padding, dilation) -> Tensor:
    """The flat input-plane position of each output's argmax: its window's origin plus the offset
    of the tap its code names (one int64 map of the output's size, built in place)."""
    (kh, kw), width, device = kernel_size, x_shape[-1], code.device
    taps = torch.tensor(
        [i * dilation[0] * width + j * dilation[1] for i in range(kh) for j in range(kw)], device=device
    )
    rows = _window_origin(code.shape[-2], stride[0], padding[0], device).view(-1, 1)
    origin = rows * width + _window_origin(code.shape[-1], stride[1], padding[1], device)
    return torch.take(taps, code.long()).add_(origin)


def _scatter_grad(grad_y: Tensor, index: Tensor, x_shape: torch.Size) -> Tensor:
    """grad_x: every output's gradient added at its argmax (overlapping windows accumulate), in
    grad_y's layout — a channels_last gradient is scattered along the (H·W) axis of its NHWC memory."""
    *lead, h, w = x_shape
    if is_channels_last(grad_y):
        n, c = lead
        grad_x = grad_y.new_zeros(n, h * w, c)
        nhwc = (t.permute(0, 2, 3, 1).reshape(n, -1, c) for t in (index, grad_y))
        return grad_x.scatter_add_(1, *nhwc).view(n, h, w, c).permute(0, 3, 1, 2)
    grad_x = grad_y.new_zeros(*lead, h * w)
    return grad_x.scatter_add_(-1, index.reshape(*lead, -1), grad_y.reshape(*lead, -1)).view(x_shape)


def _window_code(x: Tensor, y: Tensor, index: Tensor, stride, padding, dilation, kernel_size) -> Tensor:
    """Turn flat argmax indices in the input plane into positions inside each window.

    Built in place on `index`: one more int64 map of the output's size at most (the temporaries
    of an out-of-place version made the stem max-pool the peak of a resnet18 training step).
    """
    width = x.shape[-1]
    row = torch.div(index, width, rounding_mode="floor")
    col = index.remainder_(width)
    row.sub_(_window_origin(y.shape[-2], stride[0], padding[0], x.device).view(-1, 1))
    row.div_(dilation[0], rounding_mode="floor")
    col.sub_(_window_origin(y.shape[-1], stride[1], padding[1], x.device))
    col.div_(dilation[1], rounding_mode="floor")
    return row.mul_(kernel_size[1]).add_(col)


@torch.library.custom_op("facto::max_pool2d", mutates_args=())
def max_pool2d_fwd(
    x: Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    ceil_mode: bool,
) -> tuple[Tensor, Tensor]:
    if use_triton(x):
        from facto_fx.triton_ops.max_pool import max_pool_forward

        return max_pool_forward(x, kernel_size, stride, padding, dilation, ceil_mode)
    return _forward(x, kernel_size, stride, padding, dilation, ceil_mode)


def _forward(x, kernel_size, stride, padding, dilation, ceil_mode) -> tuple[Tensor, Tensor]:
    """The PyTorch path; on fake tensors, the fake kernel (same dtypes, shapes and strides)."""
    if _tiles_exactly(x, kernel_size, stride, padding, dilation):
        y, code = _tiled_max(x, *kernel_size)
    else:
        y, index = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)
        code = _window_code(x, y, index, stride, padding, dilation, kernel_size)
    return y, pack_bits(code.to(torch.uint8), code_bits(kernel_size[0] * kernel_size[1]), is_channels_last(x))


max_pool2d_fwd.register_fake(_forward)


def _setup_context(ctx, inputs, output):
    x, kernel_size, stride, padding, dilation, _ = inputs
    ctx.save_for_backward(output[1])
    ctx.x_shape = x.shape
    ctx.pool_args = (kernel_size, stride, padding, dilation)
    ctx.channels_last = is_channels_last(x)  # the order the codes were packed in
    ctx.kernels = current_mode()
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_code):
    (packed,) = ctx.saved_tensors
    kernel_size, stride, padding, dilation = ctx.pool_args
    if use_triton(grad_y, ctx.kernels):
        from facto_fx.triton_ops.max_pool import max_pool_backward

        grad_x = max_pool_backward(
            grad_y, packed, ctx.x_shape, kernel_size, stride, padding, dilation, ctx.channels_last
        )
        return grad_x, None, None, None, None, None
    code = unpack_codes(packed, code_bits(kernel_size[0] * kernel_size[1]), grad_y.shape, ctx.channels_last)
    index = _argmax_positions(code, ctx.x_shape, kernel_size, stride, padding, dilation)
    return _scatter_grad(grad_y, index, ctx.x_shape), None, None, None, None, None


register_autograd(max_pool2d_fwd, _backward, _setup_context)


def max_pool2d(
    x: Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    ceil_mode: bool = False,
) -> Tensor:
    """F.max_pool2d with a compact saved argmax code (at most 8 bits per output element)."""
    kernel = pair(kernel_size)
    stride = kernel if stride is None or stride == [] else pair(stride)
    if not records_gradient(x):
        return F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
    padding, dilation = pair(padding), pair(dilation)
    pools = list(zip(x.shape[-2:], kernel, stride, padding, dilation, strict=True))
    if any(_window_in_padding(*pool, ceil_mode) for pool in pools):
        return _explicitly_padded(x, pools, ceil_mode)
    return torch.ops.facto.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)[0]


def _window_in_padding(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> bool:
    """Whether some window lies wholly in the padding (dilation allows it). F.max_pool2d gives it
    -inf and an argmax index outside the input, which its own backward writes through."""
    out = pool_output_size(size, kernel, stride, padding, dilation, ceil_mode)
    starting_in_padding = range(min(out, -(-padding // stride) + 1))  # only these can miss the input
    return any(all(not 0 <= o * stride - padding + t * dilation < size for t in range(kernel))
               for o in starting_in_padding)


def _explicitly_padded(x: Tensor, pools: list[tuple[int, ...]], ceil_mode: bool) -> Tensor:
    """The same outputs as F.max_pool2d (-inf where a window holds only padding), pooled over x
    padded with -inf: such a window's argmax then lies in the padding, whose gradient F.pad drops.
    `pools` holds (size, kernel, stride, padding, dilation) for the height, then the width."""
    (_, kh, sh, ph, dh), (_, kw, sw, pw, dw) = pools
    out_h, out_w = (pool_output_size(*pool, ceil_mode) for pool in pools)
    padded = F.pad(x, (pw, pw, ph, ph), value=float("-inf"))
    y = torch.ops.facto.max_pool2d(padded, [kh, kw], [sh, sw], [0, 0], [dh, dw], ceil_mode)[0]
    return y[..., :out_h, :out_w]
