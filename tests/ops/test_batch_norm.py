"""facto batch_norm with frozen statistics against F.batch_norm in eval mode."""

import pytest
import torch
import torch.nn.functional as F
from leaves import leaf
from saved_tensors import saved_tensors as _saved

import facto_fx.ops as facto

F64 = torch.float64
EPS = 1e-3


def _excluding(saved, *params):
    ptrs = {p.untyped_storage().data_ptr() for p in params if p is not None and p.numel()}
    return [t for t in saved if not (t.numel() and t.untyped_storage().data_ptr() in ptrs)]


def _window_sum(t, k):
    """Sum over k×k windows, the last row/column of windows partial (zero-padded to a multiple of k)."""
    t = F.pad(t, (0, -t.shape[-1] % k, 0, -t.shape[-2] % k))
    return t.unflatten(-2, (-1, k)).unflatten(-1, (-1, k)).sum((-3, -1))


def _inputs(shape, seed=0, affine=True):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=F64)
    mean = torch.randn(c, generator=g, dtype=F64)
    var = torch.rand(c, generator=g, dtype=F64) + 0.5
    weight = torch.randn(c, generator=g, dtype=F64) if affine else None
    bias = torch.randn(c, generator=g, dtype=F64) if affine else None
    return x, mean, var, weight, bias


def _facto_and_reference(x, mean, var, weight, bias, k):
    """Run both with fresh leaves; return outputs, the leaves of each, and a shared grad_y."""
    f_leaves = [leaf(t) for t in (x, weight, bias)]
    r_leaves = [leaf(t) for t in (x, weight, bias)]
    fx, fw, fb = f_leaves
    rx, rw, rb = r_leaves
    y = facto.batch_norm(fx, mean, var, fw, fb, eps=EPS, lossy_kernel=k)
    y_ref = F.batch_norm(rx, mean, var, rw, rb, training=False, eps=EPS)
    return y, y_ref, f_leaves, r_leaves


def _grads(y, leaves, grad_y):
    wanted = [t for t in leaves if t is not None]
    got = iter(torch.autograd.grad(y, wanted, grad_y))
    return [None if t is None else next(got) for t in leaves]


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (4, 3), (2, 3, 5)], ids=["nchw", "bc", "bcl"])
@pytest.mark.parametrize("affine", [True, False])
def test_exact_without_pooling(shape, affine):
    """k = 1 (and always for non-4-D inputs): forward and every gradient equal eval-mode batch-norm."""
    x, mean, var, weight, bias = _inputs(shape, affine=affine)
    k = 2 if len(shape) != 4 else 1
    y, y_ref, f_leaves, r_leaves = _facto_and_reference(x, mean, var, weight, bias, k)
    torch.testing.assert_close(y, y_ref)
    grad_y = torch.randn_like(y_ref)
    for got, expected in zip(_grads(y, f_leaves, grad_y), _grads(y_ref, r_leaves, grad_y), strict=True):
        if expected is None:
            assert got is None
        else:
            torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("hw", [(6, 8), (5, 7)])
def test_pooled_grad_weight_k2(hw):
    """With k = 2, grad_γ = Σ sumpool_2(grad_y) · meanpool_2(x̂); grad_x and grad_β stay exact."""
    x, mean, var, weight, bias = _inputs((2, 3, *hw), seed=1)
    y, y_ref, f_leaves, r_leaves = _facto_and_reference(x, mean, var, weight, bias, 2)
    torch.testing.assert_close(y, y_ref)
    grad_y = torch.randn_like(y_ref)
    gx, gw, gb = _grads(y, f_leaves, grad_y)
    rgx, _, rgb = _grads(y_ref, r_leaves, grad_y)
    torch.testing.assert_close(gx, rgx)
    torch.testing.assert_close(gb, rgb)
    x_hat = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + EPS)
    mean_x_hat = _window_sum(x_hat, 2) / _window_sum(torch.ones_like(x_hat), 2)
    torch.testing.assert_close(gw, (_window_sum(grad_y, 2) * mean_x_hat).sum((0, 2, 3)))


def test_frozen_weight_saves_nothing():
    """Frozen γ: grad_x needs no feature map, so only an empty placeholder (besides γ and σ²) is saved."""
    x, mean, var, weight, bias = _inputs((2, 3, 5, 7), seed=2)
    x, bias = leaf(x), leaf(bias)
    saved = _excluding(_saved(lambda: facto.batch_norm(x, mean, var, weight, bias, eps=EPS)), weight, mean, var)
    assert saved and all(t.numel() == 0 for t in saved)


@pytest.mark.parametrize(("storage_dtype", "dtype"), [(None, F64), (torch.bfloat16, torch.bfloat16)])
def test_trained_weight_saves_pooled_x_hat(storage_dtype, dtype):
    x, mean, var, weight, bias = _inputs((2, 3, 5, 7), seed=3)
    x, weight = leaf(x), leaf(weight)
    saved = _saved(lambda: facto.batch_norm(x, mean, var, weight, bias, EPS, 2, storage_dtype))
    assert [(t.dtype, tuple(t.shape)) for t in _excluding(saved, weight, mean, var)] == [(dtype, (2, 3, 3, 4))]


def test_no_grad_path_matches():
    x, mean, var, weight, bias = _inputs((2, 3, 4, 4), seed=4)
    with torch.no_grad():
        y = facto.batch_norm(x, mean, var, leaf(weight), bias, eps=EPS)
    torch.testing.assert_close(y, F.batch_norm(x, mean, var, weight, bias, training=False, eps=EPS))


def test_opcheck():
    x, mean, var, weight, bias = _inputs((2, 3, 5, 4), seed=5)
    args = (leaf(x), leaf(weight), leaf(bias), mean, var, EPS, 2, None, True)
    torch.library.opcheck(torch.ops.facto.batch_norm.default, args)
