"""Lossy compression helpers: the pooled projection Z_p and the sum-pool adjoint used by grad_M."""

import torch
import torch.nn.functional as F
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from facto_fx.ops.lossy import mean_pool, pooled_projection, sum_pool


def _out(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@settings(max_examples=60, deadline=None)
@given(
    c_in=st.integers(1, 3),
    c_out=st.integers(1, 3),
    h=st.integers(1, 11),
    w=st.integers(1, 11),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    k=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
# Folded-filter path: conv output 8x8 tiles evenly by k = 2 and the fused 4x4 filter is cheaper than 3x3 + pool.
@example(c_in=2, c_out=3, h=8, w=8, kh=3, kw=3, stride=(1, 1), padding=(1, 1), dilation=(1, 1), k=2, seed=0)
@example(c_in=2, c_out=2, h=10, w=9, kh=3, kw=2, stride=(2, 1), padding=(2, 0), dilation=(2, 1), k=2, seed=1)
@example(c_in=1, c_out=2, h=9, w=9, kh=3, kw=3, stride=(1, 1), padding=(0, 0), dilation=(1, 1), k=3, seed=2)
@example(c_in=3, c_out=2, h=5, w=4, kh=2, kw=3, stride=(1, 1), padding=(1, 1), dilation=(1, 1), k=2, seed=3)
# 1x1, stride 1, unpadded: x is pooled before the projection (odd sizes: partial edge windows).
@example(c_in=3, c_out=2, h=7, w=5, kh=1, kw=1, stride=(1, 1), padding=(0, 0), dilation=(2, 1), k=2, seed=4)
def test_pooled_projection_matches_conv_then_pool(c_in, c_out, h, w, kh, kw, stride, padding, dilation, k, seed):
    """Z_p must equal mean-pooling the full conv output, whether or not the pool is folded into the filter."""
    assume(_out(h, kh, stride[0], padding[0], dilation[0]) >= 1)
    assume(_out(w, kw, stride[1], padding[1], dilation[1]) >= 1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c_in, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, kh, kw, generator=g, dtype=torch.float64)
    expected = F.avg_pool2d(F.conv2d(x, weight, None, stride, padding, dilation), k, k, ceil_mode=True)
    got = pooled_projection(x, weight, stride, padding, dilation, k)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def _upsample_crop(z, k, h, w):
    return z.repeat_interleave(k, -2).repeat_interleave(k, -1)[..., :h, :w]


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 10), w=st.integers(1, 10), k=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_sum_pool_is_adjoint_of_nearest_upsampling(h, w, k, seed):
    """grad_M pools grad_Y instead of upsampling Z_p; that is exact only if sum_pool is U's adjoint."""
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
    z = torch.randn(2, 3, -(-h // k), -(-w // k), generator=g, dtype=torch.float64)
    pooled = sum_pool(grad, k)
    assert pooled.shape == z.shape
    torch.testing.assert_close((pooled * z).sum(), (grad * _upsample_crop(z, k, h, w)).sum(), rtol=1e-12, atol=1e-12)


def test_mean_pool_averages_partial_windows_over_covered_values():
    """Edge windows in ceil mode average only the values they cover (no implicit zeros)."""
    x = torch.arange(15, dtype=torch.float64).view(1, 1, 3, 5)
    expected = torch.tensor([[[[3.0, 5.0, 6.5], [10.5, 12.5, 14.0]]]], dtype=torch.float64)
    torch.testing.assert_close(mean_pool(x, 2), expected)
    assert mean_pool(x, 1) is x
