"""facto scale (y = s·x, s a learnable scalar): exact grad_x, grad_s from the mean-pooled input."""

import pytest
import torch
import torch.nn.functional as F
from saved_tensors import saved_tensors as _saved

import facto_fx.ops as facto

F64 = torch.float64

def _window_sum(t, k):
    """Sum over k×k windows, the last row/column of windows partial (zero-padded to a multiple of k)."""
    t = F.pad(t, (0, -t.shape[-1] % k, 0, -t.shape[-2] % k))
    return t.unflatten(-2, (-1, k)).unflatten(-1, (-1, k)).sum((-3, -1))


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=F64, requires_grad=True)
    s = torch.randn((), generator=g, dtype=F64).requires_grad_(True)
    return x, s


@pytest.mark.parametrize("s_shape", [(), (1,)])
def test_forward_and_grad_x_exact(s_shape):
    x, s = _inputs((2, 3, 5, 7))
    s = s.detach().reshape(s_shape).requires_grad_(True)
    y = facto.scale(x, s, lossy_kernel=2)
    assert torch.equal(y, x * s)
    grad_y = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, [x], grad_y)
    (rgx,) = torch.autograd.grad(x * s, [x], grad_y)
    torch.testing.assert_close(gx, rgx)


@pytest.mark.parametrize(
    ("shape", "k"),
    [pytest.param((2, 3, 5, 7), 1), pytest.param((4, 6), 2)],
    ids=["nchw_k1", "2d_input"],
)
def test_grad_s_exact_without_pooling(shape, k):
    """With nothing to pool, grad_s must be autograd's exact Σ grad_y · x."""
    x, s = _inputs(shape, seed=1)
    y = facto.scale(x, s, lossy_kernel=k)
    grad_y = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, [s], grad_y)[0], torch.autograd.grad(x * s, [s], grad_y)[0])


@pytest.mark.parametrize("hw", [(6, 8), (5, 7), (1, 3)])
def test_grad_s_pooled_formula_k2(hw):
    """With k = 2, grad_s = Σ sumpool_2(grad_y) · meanpool_2(x), edge windows partial on odd sizes."""
    x, s = _inputs((2, 3, *hw), seed=2)
    y = facto.scale(x, s, lossy_kernel=2)
    grad_y = torch.randn_like(y)
    gx, gs = torch.autograd.grad(y, [x, s], grad_y)
    mean_x = _window_sum(x.detach(), 2) / _window_sum(torch.ones_like(x), 2)
    torch.testing.assert_close(gs, (_window_sum(grad_y, 2) * mean_x).sum())
    torch.testing.assert_close(gx, grad_y * s.detach())


@pytest.mark.parametrize(("storage_dtype", "dtype"), [(None, F64), (torch.bfloat16, torch.bfloat16)])
def test_saves_pooled_map_in_storage_dtype(storage_dtype, dtype):
    x, s = _inputs((2, 3, 5, 7), seed=3)
    saved = _saved(lambda: facto.scale(x, s, lossy_kernel=2, storage_dtype=storage_dtype))
    maps = [(t.dtype, tuple(t.shape)) for t in saved if t.data_ptr() != s.data_ptr()]
    assert maps == [(dtype, (2, 3, 3, 4))]


def test_frozen_s_saves_no_map():
    """When only x needs a gradient (s frozen), nothing but s and an empty placeholder is saved."""
    x, s = _inputs((2, 3, 5, 7), seed=4)
    s = s.detach()
    saved = _saved(lambda: facto.scale(x, s, lossy_kernel=2))
    assert all(t.numel() == 0 for t in saved if t.data_ptr() != s.data_ptr())


@pytest.mark.parametrize("s_shape", [(2,), (0,), (1, 3)])
def test_non_scalar_s_raises(s_shape):
    with pytest.raises(ValueError):
        facto.scale(torch.randn(2, 3, 4, 4), torch.ones(s_shape, requires_grad=True))


def test_no_grad_path_matches():
    x, s = _inputs((2, 3, 4, 4), seed=5)
    with torch.no_grad():
        assert torch.equal(facto.scale(x, s), x * s)


@pytest.mark.parametrize(("k", "save_pooled"), [(2, True), (1, True), (2, False)])
def test_opcheck(k, save_pooled):
    """Without a saved map the scale cannot have a gradient, so it is passed frozen."""
    x, s = _inputs((2, 3, 5, 6), seed=3)
    s.requires_grad_(save_pooled)
    torch.library.opcheck(torch.ops.facto.scale.default, (x, s, k, None, save_pooled))


def test_gradient_without_saved_map_is_a_clear_error():
    x, s = _inputs((2, 3, 4, 4))
    y, _ = torch.ops.facto.scale(x, s, 2, None, False)
    with pytest.raises(RuntimeError, match="save_pooled=False"):
        y.sum().backward()
