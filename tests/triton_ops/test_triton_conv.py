"""Triton grad_M: the fused sum-pool + split-K matmul equals einsum(sumpool_k(grad_Y), Z_p)."""

import pytest
import torch
from kernel_cases import DTYPES, KernelSpy, channels_last, in_layout, noncontiguous, randn

import facto_fx
from facto_fx.ops import conv2d
from facto_fx.ops.lossy import sum_pool
from facto_fx.shapes import pooled_size
from facto_fx.triton_ops import conv
from facto_fx.triton_ops.conv import grad_m


def _reference(grad_y, z_p, k):
    return torch.einsum("bohw,brhw->or", sum_pool(grad_y.float(), k), z_p.float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("batch", "c_out", "rank", "height", "width", "k"),
    [(2, 5, 3, 7, 9, 2), (1, 40, 35, 6, 6, 2), (3, 4, 2, 5, 5, 1), (2, 3, 2, 7, 8, 3)],
)
def test_matches_reference(batch, c_out, rank, height, width, k, dtype):
    grad_y = randn((batch, c_out, height, width), dtype)
    z_p = randn((batch, rank, pooled_size(height, k), pooled_size(width, k)), dtype, seed=1)
    out = grad_m(grad_y, z_p, k)
    assert out.dtype == torch.float32 and out.shape == (c_out, rank)
    torch.testing.assert_close(out, _reference(grad_y, z_p, k), rtol=1e-4, atol=1e-4)


def test_noncontiguous_inputs():
    grad_y = noncontiguous((2, 3, 5, 6), torch.float32)
    z_p = noncontiguous((2, 2, 3, 3), torch.float32, seed=1)
    torch.testing.assert_close(grad_m(grad_y, z_p, 2), _reference(grad_y, z_p, 2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("z_layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_grad_y_is_read_in_place(dtype, z_layout, monkeypatch):
    """A channels_last grad_Y (and Z_p, in either layout) is read where it lies, not copied."""
    grad_y = channels_last(randn((2, 40, 7, 9), dtype))  # more channels than one tile holds
    z_p = in_layout(randn((2, 3, 4, 5), dtype, seed=1), z_layout)
    spy = KernelSpy.install(monkeypatch, conv, "_grad_m_kernel")
    out = grad_m(grad_y, z_p, 2)
    assert spy.read_in_place(grad_y) and spy.read_in_place(z_p)
    torch.testing.assert_close(out, _reference(grad_y, z_p, 2), rtol=1e-4, atol=1e-4)


def test_channels_last_conv_grad_m_matches_the_pytorch_path(monkeypatch):
    """facto::conv2d on a channels_last map: the Triton grad_M reads grad_Y in place and equals the
    PyTorch path's."""
    x = channels_last(randn((2, 4, 7, 6), torch.float32))
    weight, D = randn((5, 4, 3, 3), torch.float32, seed=1), randn((2, 36), torch.float32, seed=2)
    grad_y = channels_last(randn((2, 5, 7, 6), torch.float32, seed=4))
    spy = KernelSpy.install(monkeypatch, conv, "_grad_m_kernel")
    grads = {}
    for kernels in ("torch", "triton"):
        M = randn((5, 2), torch.float32, seed=3).requires_grad_()
        with facto_fx.use_kernels(kernels):
            conv2d(x, weight, M, D, padding=1).backward(grad_y)
        grads[kernels] = M.grad
    assert len(spy.launches) == 1 and spy.read_in_place(grad_y)
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("allow_tf32", [False, True])
def test_products_follow_torchs_tf32_setting(allow_tf32):
    """fp32 unless the user enabled TF32 for torch's matmuls (the interpreter computes fp32 either
    way; on a GPU the TF32 case is only as close as 10 mantissa bits allow)."""
    from facto_fx.triton_ops import conv

    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        assert conv.dot_precision() == ("tf32" if allow_tf32 else "ieee")
        grad_y, z_p = randn((2, 5, 6, 6), torch.float32), randn((2, 3, 3, 3), torch.float32, seed=1)
        loose = allow_tf32 and grad_y.is_cuda
        tolerance = dict(rtol=2e-3, atol=2e-3) if loose else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad_m(grad_y, z_p, 2), _reference(grad_y, z_p, 2), **tolerance)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
