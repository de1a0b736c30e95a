"""conv2d_input: the input gradient of a convolution, checked against autograd through F.conv2d."""

import pytest
import torch
import torch.nn.functional as F

from facto_fx.ops.conv_input import conv2d_input


def _autograd_input_grad(x, weight, grad_y, stride, padding, groups):
    x = x.detach().requires_grad_(True)
    F.conv2d(x, weight, None, stride, padding, 1, groups).backward(grad_y)
    return x.grad


@pytest.mark.parametrize(
    ("shape", "stride", "groups"),
    [
        ((2, 4, 8, 8), 2, 1),  # ResNet's downsample
        ((1, 4, 7, 9), 2, 1),  # odd sizes: the last row and column are read
        ((2, 6, 8, 10), 3, 2),  # a stride that leaves the last row and column unread, grouped
        ((2, 4, 9, 6), (2, 1), 1),  # strided along the height only
    ],
    ids=["downsample", "odd", "stride3_groups", "rows_only"],
)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_strided_one_by_one_matches_autograd(shape, stride, groups, layout, dtype):
    """The fast path (strided 1×1): values as autograd's, and a zero gradient at unread pixels."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).contiguous(memory_format=layout)
    weight = torch.randn(5 * groups, shape[1] // groups, 1, 1, generator=g, dtype=torch.float64).to(dtype)
    grad_y = torch.randn_like(F.conv2d(x, weight, None, stride, 0, 1, groups)).contiguous(memory_format=layout)
    got = conv2d_input(x.shape, weight, grad_y, stride, 0, 1, groups)
    expected = _autograd_input_grad(x, weight, grad_y, stride, 0, groups)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got, expected, **tol)
    assert got.dtype == dtype and got.is_contiguous(memory_format=layout)


@pytest.mark.parametrize(("kernel", "stride", "padding"), [(3, 2, 1), (1, 1, 0), (1, 2, 1)], ids=str)
def test_other_convolutions_are_torchs(kernel, stride, padding):
    """Outside the fast path (any kernel but 1×1, stride 1, padding): torch's conv2d_input."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 3, kernel, kernel, generator=g, dtype=torch.float64)
    grad_y = torch.randn_like(F.conv2d(x, weight, None, stride, padding))
    expected = _autograd_input_grad(x, weight, grad_y, stride, padding, 1)
    torch.testing.assert_close(conv2d_input(x.shape, weight, grad_y, stride, padding, 1), expected)
