"""facto linear against a dense F.linear with Ω = W + M·D: every gradient is exact, only D·x is saved."""

import pytest
import torch
import torch.nn.functional as F
from leaves import leaf
from saved_tensors import saved_tensors as _saved

import facto_fx.ops as facto

F64 = torch.float64


def _tensors(lead, i, o, r, bias=True, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, i, generator=g, dtype=dtype)
    weight = torch.randn(o, i, generator=g, dtype=dtype)
    M = torch.randn(o, r, generator=g, dtype=dtype)
    D = torch.randn(r, i, generator=g, dtype=dtype)
    b = torch.randn(o, generator=g, dtype=dtype) if bias else None
    return x, weight, M, D, b


def _excluding(saved, *params):
    ptrs = {p.untyped_storage().data_ptr() for p in params if p is not None and p.numel()}
    return [t for t in saved if not (t.numel() and t.untyped_storage().data_ptr() in ptrs)]


@pytest.mark.parametrize("lead", [(5,), (1,), (2, 3)], ids=["BxI", "batch1", "BxTxI"])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_grads_match_dense_reparameterisation(lead, bias):
    """grad_x, grad_M and grad_bias equal autograd of F.linear(x, W + M·D, b), for 2-D and 3-D inputs."""
    x, weight, M, D, b = _tensors(lead, 6, 4, 3, bias=bias)
    assert _check_against_dense(x, weight, M, D, b).shape == (*lead, 4)


def _check_against_dense(x, weight, M, D, b):
    """facto.linear's output and every gradient equal autograd of F.linear(x, W + M·D, b)."""
    fx, fM, fb = leaf(x), leaf(M), leaf(b)
    rx, rM, rb = leaf(x), leaf(M), leaf(b)
    y = facto.linear(fx, weight, fM, D, fb)
    y_ref = F.linear(rx, weight + rM @ D, rb)
    torch.testing.assert_close(y, y_ref)
    grad_y = torch.randn_like(y_ref)
    y.backward(grad_y)
    y_ref.backward(grad_y)
    torch.testing.assert_close(fx.grad, rx.grad)
    torch.testing.assert_close(fM.grad, rM.grad)
    if b is not None:
        torch.testing.assert_close(fb.grad, rb.grad)
    return y


def test_only_m_trained():
    """A first layer whose input needs no grad still gets the exact grad_M."""
    x, weight, M, D, _ = _tensors((4,), 5, 3, 2, seed=1)
    fM, rM = leaf(M), leaf(M)
    grad_y = torch.randn(4, 3, dtype=F64)
    facto.linear(x, weight, fM, D).backward(grad_y)
    F.linear(x, weight + rM @ D).backward(grad_y)
    torch.testing.assert_close(fM.grad, rM.grad)


@pytest.mark.parametrize(("storage_dtype", "expected"), [(None, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_saves_only_projection_in_storage_dtype(storage_dtype, expected):
    """Instead of x (B×I) the op keeps D·x (B×R), in the storage dtype."""
    x, weight, M, D, b = _tensors((7,), 12, 5, 3, dtype=torch.float32, seed=2)
    x, M, b = leaf(x), leaf(M), leaf(b)
    saved = _saved(lambda: facto.linear(x, weight, M, D, b, storage_dtype=storage_dtype))
    assert [(t.dtype, tuple(t.shape)) for t in _excluding(saved, weight, M, D)] == [(expected, (7, 3))]


def test_bf16_storage_keeps_grad_m_close():
    x, weight, M, D, _ = _tensors((16,), 20, 6, 4, dtype=torch.float32, seed=3)
    fM, rM = leaf(M), leaf(M)
    grad_y = torch.randn(16, 6)
    facto.linear(x, weight, fM, D, storage_dtype=torch.bfloat16).backward(grad_y)
    F.linear(x, weight + rM @ D).backward(grad_y)
    assert ((fM.grad - rM.grad).norm() / rM.grad.norm()).item() < 2e-2


@pytest.mark.parametrize(
    ("lead", "bias", "storage_dtype"), [((3,), True, None), ((2, 3), False, torch.bfloat16)]
)
def test_opcheck(lead, bias, storage_dtype):
    """Schema, fake kernel and autograd registration agree with the real kernel."""
    x, weight, M, D, b = _tensors(lead, 5, 4, 2, bias=bias)
    x.requires_grad_(True)
    M.requires_grad_(True)
    torch.library.opcheck(torch.ops.facto.linear.default, (x, weight, M, D, b, storage_dtype))


def test_gradcheck():
    """Finite differences agree with the backward wrt x, M and bias (3-D input)."""
    x, weight, M, D, b = _tensors((2, 3), 4, 3, 2, seed=4)

    def f(x, M, b):
        return facto.linear(x, weight, M, D, b)

    assert torch.autograd.gradcheck(f, (x.requires_grad_(True), M.requires_grad_(True), b.requires_grad_(True)))


def test_no_grad_path_matches():
    """Inference is a plain linear with Ω and gives the same output as the training path."""
    x, weight, M, D, b = _tensors((2, 3), 5, 4, 2, seed=5)
    M.requires_grad_(True)
    with torch.no_grad():
        y_nograd = facto.linear(x, weight, M, D, b)
    y_grad = facto.linear(x, weight, M, D, b)
    assert not y_nograd.requires_grad and y_grad.requires_grad
    torch.testing.assert_close(y_nograd, F.linear(x, weight + M.detach() @ D, b))
    torch.testing.assert_close(y_nograd, y_grad.detach())


@pytest.mark.parametrize("rows", [2, 64], ids=["few-rows-through-Dx", "many-rows-through-MD"])
def test_both_low_rank_paths_match_the_dense_reparameterisation(rows):
    """Few rows take y = x·Wᵀ + (D·x)·Mᵀ, many rows form M·D; both are the same function."""
    from facto_fx.ops.linear import _factored

    x, weight, M, D, b = _tensors((rows,), 16, 8, 5, seed=2)
    assert _factored(x, weight) == (rows == 2)
    _check_against_dense(x, weight, M, D, b)
