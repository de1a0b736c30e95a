"""conv2d_input: the input gradient of a convolution, checked against autograd through F.conv2d."""

import pytest
import torch
import torch.nn.functional as F

from facto_fx.memory import peak_step_bytes
from facto_fx.ops.conv_input import conv2d_input


def _autograd_input_grad(x, weight, grad_y, stride, padding, dilation, groups):
    x = x.detach().double().requires_grad_(True)
    F.conv2d(x, weight.double(), None, stride, padding, dilation, groups).backward(grad_y.double())
    return x.grad


# (input shape, out channels, kernel, stride, padding, dilation, groups): every path of conv2d_input.
CASES = {
    "downsample": ((2, 4, 8, 8), 5, 1, 2, 0, 1, 1),  # ResNet's strided 1×1 (its own path when contiguous)
    "downsample_odd": ((1, 4, 7, 9), 5, 1, 2, 0, 1, 1),  # the last row and column are read
    "stride3_groups": ((2, 6, 8, 10), 4, 1, 3, 0, 1, 2),  # leaves the last row and column unread
    "rows_only": ((2, 4, 9, 6), 5, 1, (2, 1), 0, 1, 1),
    "one_by_one_padded": ((2, 3, 9, 8), 4, 1, 2, 1, 1, 1),
    "pointwise": ((3, 5, 6, 7), 8, 1, 1, 0, 1, 1),
    "dense_3x3_s2": ((2, 3, 9, 8), 4, 3, 2, 1, 1, 1),  # output padding 0 along one side, 1 along the other
    "dense_5x5_dilated": ((1, 3, 13, 11), 4, 5, 1, 4, 2, 1),
    "dense_3x3_s3_asym": ((2, 3, 10, 11), 2, (3, 1), (3, 2), (1, 0), 1, 1),
    "depthwise_3x3_s2": ((2, 6, 11, 10), 6, 3, 2, 1, 1, 6),
    "depthwise_x2": ((1, 4, 7, 7), 8, 5, 1, 2, 1, 4),  # channel multiplier 2
    "grouped_3x3": ((2, 8, 9, 9), 4, 3, 1, 1, 1, 2),
    "grouped_3x3_s2": ((2, 8, 9, 10), 6, 3, 2, 1, 1, 2),  # RegNet's strided grouped conv
}


def _case(name, dtype, layout, seed=0):
    shape, out_channels, kernel, stride, padding, dilation, groups = CASES[name]
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).contiguous(memory_format=layout)
    weight = torch.randn(out_channels, shape[1] // groups, kh, kw, generator=g, dtype=torch.float64).to(dtype)
    y = F.conv2d(x.double(), weight.double(), None, stride, padding, dilation, groups)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype).contiguous(memory_format=layout)
    return x, weight, grad_y, (stride, padding, dilation, groups)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_autograd(name, layout, dtype):
    """Every path, dtype and layout: autograd's values (float64), in grad_y's dtype and layout, zero at
    the pixels the convolution never read."""
    x, weight, grad_y, (stride, padding, dilation, groups) = _case(name, dtype, layout)
    got = conv2d_input(x.shape, weight, grad_y, stride, padding, dilation, groups)
    expected = _autograd_input_grad(x, weight, grad_y, stride, padding, dilation, groups)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    assert got.shape == x.shape and got.dtype == dtype and got.is_contiguous(memory_format=layout)
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_a_strided_grad_y_matches_autograd():
    """A grad_y in neither layout (a slice) takes the transposed convolution as it is."""
    x, weight, grad_y, args = _case("dense_3x3_s2", torch.float32, torch.contiguous_format)
    wide = torch.randn(*grad_y.shape[:3], 2 * grad_y.shape[3])
    wide[..., ::2] = grad_y
    got = conv2d_input(x.shape, weight, wide[..., ::2], *args)
    torch.testing.assert_close(got.double(), _autograd_input_grad(x, weight, grad_y, *args), rtol=1e-5, atol=1e-5)


def test_under_autocast_the_gradient_keeps_grad_ys_dtype():
    """Called inside a bf16 autocast region, the fp32 gradient stays fp32 (autocast would round it)."""
    x, weight, grad_y, args = _case("dense_3x3_s2", torch.float32, torch.contiguous_format)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = conv2d_input(x.shape, weight, grad_y, *args)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _autograd_input_grad(x, weight, grad_y, *args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize(("kernel", "groups"), [(3, 1), (3, 2), (3, 32), (1, 1)],
                         ids=["dense_3x3", "grouped_3x3", "depthwise", "pointwise"])
def test_holds_less_than_torchs_conv2d_input(layout, kernel, groups):
    """The point of the module: the peak while computing the gradient, counted by the allocator's
    events, is below torch.nn.grad.conv2d_input's (which copies an expanded stand-in input), and
    at most 1.5 times the input's size in channels_last, 2.5 times in NCHW (3-4 times for torch's)."""
    x = torch.randn(4, 32, 40, 40).contiguous(memory_format=layout)
    weight = torch.randn(32, 32 // groups, kernel, kernel)
    padding = kernel // 2
    grad_y = torch.randn_like(F.conv2d(x, weight, None, 2, padding, 1, groups))
    ours = peak_step_bytes(lambda: conv2d_input(x.shape, weight, grad_y, 2, padding, 1, groups))
    torchs = peak_step_bytes(lambda: torch.nn.grad.conv2d_input(x.shape, weight, grad_y, 2, padding, 1, groups))
    x_bytes = x.numel() * x.element_size()
    assert ours < torchs and ours <= (1.5 if layout == torch.channels_last else 2.5) * x_bytes
