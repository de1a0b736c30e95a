"""facto conv2d against a dense conv with Ω = W + reshape(M·D) and an explicit upsampled-Z_p gradient."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from leaves import leaf
from saved_tensors import saved_tensors as _saved

import facto_fx.ops as facto
from facto_fx.ops.conv import factored

F64 = torch.float64


def _tensors(b, c_in, c_out, c_r, kh, kw, h, w, bias=True, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c_in, h, w, generator=g, dtype=dtype)
    weight = torch.randn(c_out, c_in, kh, kw, generator=g, dtype=dtype)
    M = torch.randn(c_out, c_r, generator=g, dtype=dtype)
    D = torch.randn(c_r, c_in * kh * kw, generator=g, dtype=dtype)
    b_ = torch.randn(c_out, generator=g, dtype=dtype) if bias else None
    return x, weight, M, D, b_


def _grads(out, inputs, grad_out):
    wanted = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(out, wanted, grad_out))
    return [None if t is None else next(got) for t in inputs]


def _dense(x, weight, M, D, bias, stride, padding, dilation):
    return F.conv2d(x, weight + (M @ D).view(weight.shape), bias, stride, padding, dilation)


def _upsampled_grad_m(x, D, weight_shape, grad_y, stride, padding, dilation, k):
    """Σ_{b,h,w} grad_Y[o] · U(Z_p)[r], with U nearest upsampling by k cropped to the output size."""
    z = F.conv2d(x, D.view(D.shape[0], *weight_shape[1:]), None, stride, padding, dilation)
    z_p = F.avg_pool2d(z, k, k, ceil_mode=True)
    h, w = grad_y.shape[-2:]
    upsampled = z_p.repeat_interleave(k, 2).repeat_interleave(k, 3)[:, :, :h, :w]
    return torch.einsum("bohw,brhw->or", grad_y, upsampled)


def _run_facto(x, weight, M, D, bias, stride, padding, dilation, k):
    x, M, bias = leaf(x), leaf(M), leaf(bias)
    y = facto.conv2d(x, weight, M, D, bias, stride, padding, dilation, lossy_kernel=k)
    return y, (x, M, bias)


def _check_against_dense(x, weight, M, D, bias, args, k, generator=None):
    """Output, grad_x and grad_bias equal dense autograd of W + M·D; grad_M is the upsampled-Z_p formula."""
    y, leaves = _run_facto(x, weight, M, D, bias, *args, k=k)
    rx, rb = leaf(x), leaf(bias)
    y_ref = _dense(rx, weight, M, D, rb, *args)
    torch.testing.assert_close(y, y_ref)
    grad_y = torch.randn(y_ref.shape, generator=generator, dtype=y_ref.dtype)
    gx, gM, gb = _grads(y, leaves, grad_y)
    rgx, rgb = _grads(y_ref, (rx, rb), grad_y)
    torch.testing.assert_close(gx, rgx)
    torch.testing.assert_close(gM, _upsampled_grad_m(x, D, weight.shape, grad_y, *args, k))
    if bias is None:
        assert gb is None
    else:
        torch.testing.assert_close(gb, rgb)


def _excluding(saved, *params):
    ptrs = {p.untyped_storage().data_ptr() for p in params if p is not None and p.numel()}
    return [t for t in saved if not (t.numel() and t.untyped_storage().data_ptr() in ptrs)]


@pytest.mark.parametrize("bias", [True, False])
def test_k1_forward_and_all_grads_match_dense_reparameterisation(bias):
    """With lossy_kernel = 1 every gradient is the exact gradient of W + M·D."""
    x, weight, M, D, b = _tensors(2, 3, 4, 2, 3, 3, 7, 6, bias=bias)
    args = ((2, 1), (1, 0), (1, 2))
    y, leaves = _run_facto(x, weight, M, D, b, *args, k=1)
    rx, rM, rb = leaf(x), leaf(M), leaf(b)
    y_ref = F.conv2d(rx, weight + (rM @ D).view(weight.shape), rb, *args)
    torch.testing.assert_close(y, y_ref)
    grad_y = torch.randn_like(y_ref)
    for got, expected in zip(_grads(y, leaves, grad_y), _grads(y_ref, (rx, rM, rb), grad_y), strict=True):
        if expected is None:
            assert got is None
        else:
            torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(("k", "h", "w"), [(2, 8, 8), (2, 9, 8), (3, 9, 9), (3, 7, 8)])
def test_pooled_grad_m_equals_upsampled_z_p_formula(k, h, w):
    """With k > 1, grad_M is the paper's upsample-then-multiply; grad_x and grad_bias stay exact.

    Outputs that tile by k take the folded-filter projection, the others conv-then-pool.
    """
    x, weight, M, D, b = _tensors(2, 2, 3, 2, 3, 3, h, w, seed=1)
    _check_against_dense(x, weight, M, D, b, ((1, 1), (1, 1), (1, 1)), k)


@pytest.mark.parametrize("k", [1, 2])
def test_factored_path_matches_dense(k):
    """A wide layer on a tiny map takes the factored path; output and grads are still as specified."""
    x, weight, M, D, b = _tensors(1, 3, 40, 2, 3, 3, 5, 5, seed=7)
    args = ((2, 2), (1, 1), (1, 1))
    assert factored(x.shape, weight.shape, (3, 3))
    _check_against_dense(x, weight, M, D, b, args, k)


@st.composite
def conv_cases(draw):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    assume((h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) >= 0)
    assume((w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) >= 0)
    shape = dict(
        b=draw(st.integers(1, 2)), c_in=draw(st.integers(1, 3)), c_out=draw(st.integers(1, 3)),
        c_r=draw(st.integers(1, 3)), kh=kh, kw=kw, h=h, w=w, bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    return shape, (stride, padding, dilation), draw(st.integers(1, 3))


@settings(max_examples=25, deadline=None)
@given(case=conv_cases())
def test_property_forward_and_grads(case):
    """Odd sizes, batch 1, strides, padding, dilation, with and without bias: all gradients as specified."""
    shape, args, k = case
    x, weight, M, D, b = _tensors(**shape)
    _check_against_dense(x, weight, M, D, b, args, k, torch.Generator().manual_seed(shape["seed"]))


def test_only_m_trained_first_layer():
    """The input of the first layer needs no grad: grad_M alone must still come out right."""
    x, weight, M, D, _ = _tensors(1, 3, 4, 2, 3, 3, 6, 6, bias=False, seed=2)
    args = ((1, 1), (1, 1), (1, 1))
    M_leaf = leaf(M)
    y = facto.conv2d(x, weight, M_leaf, D, None, *args, lossy_kernel=2)
    grad_y = torch.randn_like(y)
    (gM,) = torch.autograd.grad(y, [M_leaf], grad_y)
    torch.testing.assert_close(gM, _upsampled_grad_m(x, D, weight.shape, grad_y, *args, 2))


def test_bf16_storage_saves_small_map_and_keeps_grad_m_close():
    """storage_dtype=bf16 halves the saved map; the only non-parameter tensor saved is Z_p, pooled."""
    b, c_in, c_out, c_r, h, w, k = 2, 3, 4, 2, 11, 10, 2
    x, weight, M, D, bias = _tensors(b, c_in, c_out, c_r, 3, 3, h, w, dtype=torch.float32, seed=3)
    args = ((1, 1), (1, 1), (1, 1))
    x, M, bias = leaf(x), leaf(M), leaf(bias)
    out = []
    saved = _saved(lambda: out.append(facto.conv2d(x, weight, M, D, bias, *args, k, torch.bfloat16)))
    saved = _excluding(saved, weight, M, D)
    assert [(t.dtype, tuple(t.shape)) for t in saved] == [(torch.bfloat16, (b, c_r, -(-h // k), -(-w // k)))]
    grad_y = torch.randn_like(out[0])
    (gM,) = torch.autograd.grad(out[0], [M], grad_y)
    expected = _upsampled_grad_m(x.double(), D.double(), weight.shape, grad_y.double(), *args, k)
    assert ((gM.double() - expected).norm() / expected.norm()).item() < 2e-2
    torch.testing.assert_close(gM.double(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_saved_map_without_storage_dtype_is_full_precision_z_p():
    """The input X itself is never saved, only Z_p in the input's dtype."""
    x, weight, M, D, bias = _tensors(2, 3, 4, 2, 3, 3, 9, 9, seed=4)
    x, M = leaf(x), leaf(M)
    saved = _saved(lambda: facto.conv2d(x, weight, M, D, bias, (2, 2), (1, 1), (1, 1), lossy_kernel=2))
    assert [(t.dtype, tuple(t.shape)) for t in _excluding(saved, weight, M, D)] == [(F64, (2, 2, 3, 3))]


@pytest.mark.parametrize(
    ("shape", "args", "k", "storage_dtype"),
    [
        (dict(b=2, c_in=3, c_out=4, c_r=2, kh=3, kw=3, h=8, w=8), ((1, 1), (1, 1), (1, 1)), 2, None),
        (
            dict(b=1, c_in=2, c_out=3, c_r=1, kh=3, kw=1, h=7, w=5, bias=False),
            ((2, 1), (0, 1), (1, 2)),
            3,
            torch.bfloat16,
        ),
    ],
)
def test_opcheck(shape, args, k, storage_dtype):
    """Schema, fake kernel and autograd registration agree with the real kernel."""
    x, weight, M, D, b = _tensors(**shape)
    x.requires_grad_(True)
    M.requires_grad_(True)
    stride, padding, dilation = (list(a) for a in args)
    folded = facto.projection_filter(D, weight.shape, stride, dilation, k)
    torch.library.opcheck(
        torch.ops.facto.conv2d.default, (x, weight, M, D, folded, b, stride, padding, dilation, k, storage_dtype)
    )


def test_gradcheck_k1():
    """Finite differences agree with the k = 1 backward wrt both x and M."""
    x, weight, M, D, b = _tensors(1, 2, 2, 2, 2, 3, 5, 4, seed=5)

    def f(x, M):
        return facto.conv2d(x, weight, M, D, b, (1, 2), (1, 1), (2, 1), lossy_kernel=1)

    assert torch.autograd.gradcheck(f, (x.requires_grad_(True), M.requires_grad_(True)))


def test_no_grad_path_matches():
    """Inference falls back to a plain conv with Ω and returns the same output."""
    x, weight, M, D, b = _tensors(2, 3, 4, 2, 3, 3, 7, 7, seed=6)
    args = ((1, 2), (1, 0), (1, 1))
    M.requires_grad_(True)
    with torch.no_grad():
        y_nograd = facto.conv2d(x, weight, M, D, b, *args, lossy_kernel=2)
    y_grad = facto.conv2d(x, weight, M, D, b, *args, lossy_kernel=2)
    assert not y_nograd.requires_grad and y_grad.requires_grad
    torch.testing.assert_close(y_nograd, _dense(x, weight, M.detach(), D, b, *args))
    torch.testing.assert_close(y_nograd, y_grad.detach())
