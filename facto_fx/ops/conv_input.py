"""grad_X of a convolution, without torch.nn.grad.conv2d_input's full-size temporaries.

torch.nn.grad.conv2d_input runs aten's convolution_backward on a stand-in input expanded from one
element, which the backend first makes contiguous: a full-size copy of the input, on top of the
gradient itself and the backend's own buffers (on the CPU its peak is 3-4 times the input's size).
The input gradient is the transposed convolution of grad_Y, which needs no input at all:
conv_transpose2d with the output padding that restores the input's size gives the same sums.

Measured on the CPU (benchmarks/conv_input.py, oneDNN), three cases differ:

- a channels_last grad_Y: the transposed convolution writes the gradient in channels_last and
  holds little else (about 1.1 times the input's size at its peak where torch's held 3-4 times),
  2-4 times faster;
- a contiguous grad_Y of a dense 1×1 convolution without padding: a batched matrix product, Wᵀ
  times each sample's (C_out, H·W) matrix, which holds nothing but the gradient. A strided one
  (ResNet's downsample) reads every s-th pixel, so its input gradient is that product on the
  subsampled grid, written into a zero map at those pixels; oneDNN's strided 1×1 kernels, forward
  or backward, are 1.2 to 4 times slower than that;
- any other contiguous grad_Y: oneDNN reorders its operands to a blocked layout and back (about
  twice the input's size at the peak, torch's three to four times). A strided k×k filter with more
  than one input channel a group (dense or grouped, not depthwise) then runs best on channels_last
  copies of grad_Y and the gradient (2 to 2.25 times the input's size where the transposed
  convolution as it is held 3 times, at its speed); every other filter runs the transposed
  convolution as it is.

On other devices the transposed convolution runs as it is (cuDNN's backward-data kernels, which
torch's conv_transpose2d calls), which also skips the expanded input's copy; its speed there is
unmeasured.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
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
    """torch.nn.grad.conv2d_input(x_shape, weight, grad_y, stride, padding, dilation, groups): the
    same sums, in grad_y's layout and dtype (autocast, on around a backward, changes neither)."""
    with torch.autocast(grad_y.device.type, enabled=False):
        return _input_gradient(x_shape, grad_y, weight, pair(stride), pair(padding), pair(dilation), groups)


def _input_gradient(x_shape, grad_y, weight, stride, padding, dilation, groups) -> Tensor:
    on_cpu_nchw = grad_y.device.type == "cpu" and not is_channels_last(grad_y)
    one_by_one = tuple(weight.shape[2:]) == (1, 1)
    if on_cpu_nchw and one_by_one and not any(padding) and groups == 1:
        if stride == (1, 1):
            return _pointwise(weight, grad_y)
        return _strided_one_by_one(x_shape, weight, grad_y, stride)
    if on_cpu_nchw and not one_by_one and weight.shape[1] > 1 and stride != (1, 1):
        grad_y = grad_y.contiguous(memory_format=torch.channels_last)
        return _transposed(x_shape, weight, grad_y, stride, padding, dilation, groups).contiguous()
    return _transposed(x_shape, weight, grad_y, stride, padding, dilation, groups)


def _transposed(x_shape, weight, grad_y, stride, padding, dilation, groups) -> Tensor:
    """The transposed convolution of grad_y, its output padded to the input's size.

    The forward's floor division drops at most stride − 1 trailing rows (columns), which is the
    output padding that restores them (always less than the stride, as conv_transpose2d requires).
    """
    reach = [(grad_y.shape[i + 2] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (weight.shape[i + 2] - 1) + 1
             for i in (0, 1)]
    output_padding = [x_shape[i + 2] - reach[i] for i in (0, 1)]
    return F.conv_transpose2d(grad_y, weight, None, stride, padding, output_padding, groups, dilation)


def _pointwise(weight: Tensor, grad_y: Tensor) -> Tensor:
    """A 1×1 convolution's input gradient in NCHW: Wᵀ times each sample's (C_out, H·W) matrix."""
    n, _, h, w = grad_y.shape
    grad = torch.matmul(weight.reshape(weight.shape[0], -1).t(), grad_y.reshape(n, grad_y.shape[1], h * w))
    return grad.view(n, -1, h, w)


def _strided_one_by_one(x_shape, weight, grad_y, stride) -> Tensor:
    """A strided 1×1 convolution's input gradient: the stride-1 gradient of the subsampled grid,
    written into a zero map at the pixels the convolution read."""
    (s_h, s_w), (out_h, out_w) = stride, grad_y.shape[2:]
    grid = _pointwise(weight, grad_y)
    grad_x = grid.new_zeros(x_shape)
    grad_x[:, :, : (out_h - 1) * s_h + 1 : s_h, : (out_w - 1) * s_w + 1 : s_w] = grid
    return grad_x
