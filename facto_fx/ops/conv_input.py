"""grad_X of a convolution: torch's conv2d_input, with a fast path for strided 1×1 convolutions.

A strided 1×1 convolution (ResNet's downsample) reads every s-th pixel, so its input gradient is
the stride-1 input gradient of the subsampled grid, written into a zero map at those pixels. On the
CPU, oneDNN's strided 1×1 backward-data kernel is 1.2 to 4 times slower than that on ResNet's
shapes (benchmarks/conv_input.py); the values are the same sums. On a GPU torch's kernel runs: the
trade there is unmeasured.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from facto_fx.shapes import is_channels_last, pair


def conv2d_input(
    x_shape: Sequence[int],
    weight: Tensor,
    grad_y: Tensor,
    stride: int | Sequence[int],
    padding: int | Sequence[int],
    dilation: int | Sequence[int],
    groups: int = 1,
) -> Tensor:
    """torch.nn.grad.conv2d_input(x_shape, weight, grad_y, stride, padding, dilation, groups)."""
    strided_one_by_one = tuple(weight.shape[2:]) == (1, 1) and tuple(pair(stride)) != (1, 1) and not any(pair(padding))
    if not (strided_one_by_one and grad_y.device.type == "cpu"):
        return torch.nn.grad.conv2d_input(x_shape, weight, grad_y, stride, padding, dilation, groups)
    (s_h, s_w), (out_h, out_w) = pair(stride), grad_y.shape[2:]
    grid = torch.nn.grad.conv2d_input((*x_shape[:2], out_h, out_w), weight, grad_y, 1, 0, 1, groups)
    layout = torch.channels_last if is_channels_last(grad_y) else torch.contiguous_format
    grad_x = torch.empty(x_shape, dtype=grid.dtype, device=grid.device, memory_format=layout).zero_()
    grad_x[:, :, : (out_h - 1) * s_h + 1 : s_h, : (out_w - 1) * s_w + 1 : s_w] = grid
    return grad_x
