"""facto hosvd_conv2d / hosvd_linear against independent references.

Every check compares with something the implementation does not compute: dense autograd of
F.conv2d / F.linear on x (grad_X, grad_bias, and grad_W at ε = 1), or on X̂ rebuilt here from the
saved codes with plain einsum products (grad_W at ε < 1), and energies measured here from X and the
saved factors.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from leaves import leaf
from saved_tensors import saved_tensors as _saved
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import facto_fx.ops as facto

F64 = torch.float64
MODES = ["hosvd", "svd"]
# PyTorch's own "same" with an even kernel (the reference conv here) warns that it pads a copy
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")


# --------------------------------------------------------------------------------------------
# Independent references


def _dense_conv(x, w, b, stride, padding, dilation, groups):
    """PyTorch's own conv: F.pad for a (left, right, top, bottom) 4-tuple, else F.conv2d's padding."""
    if isinstance(padding, tuple) and len(padding) == 4:
        return F.conv2d(F.pad(x, padding), w, b, stride, 0, dilation, groups)
    return F.conv2d(x, w, b, stride, padding, dilation, groups)


def _rebuilt(codes, mode, kind):
    """X̂ from the saved codes with plain tensor products, times the scale (the last code)."""
    *parts, scale = codes
    if kind == "conv" and mode == "hosvd":
        core, ub, uc, uh, uw = parts
        return torch.einsum("ijkl,bi,cj,hk,wl->bchw", core, ub, uc, uh, uw) * scale
    if kind == "linear" and mode == "hosvd":
        core, ur, uf = parts
        return torch.einsum("ij,ri,fj->rf", core, ur, uf) * scale
    ub, r = parts
    return torch.einsum("bi,i...->b...", ub, r) * scale


def _kept(x, u, dim):
    """Fraction of ‖x‖² that the columns of u keep along `dim`: ‖x ×_dim uᵀ‖² / ‖x‖²."""
    projected = torch.tensordot(x, u, dims=([dim], [0]))
    return (projected.square().sum() / x.square().sum()).item()


def _factor_dims(mode, ndim):
    return list(range(ndim)) if mode == "hosvd" else [0]


def _factors(codes, mode):
    return codes[1:-1] if mode == "hosvd" else codes[:1]


def _check_energy(x, codes, mode, eps):
    """Each mode keeps ≥ eps of the energy, and one column fewer would keep less (the rank is minimal);
    the factors are orthonormal."""
    x = x.to(F64)
    for dim, u in zip(_factor_dims(mode, x.dim()), _factors(codes, mode), strict=True):
        u = u.to(F64)
        torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1], dtype=F64), atol=1e-5, rtol=0)
        assert _kept(x, u, dim) >= eps - 1e-9
        if u.shape[1] > 1:
            assert _kept(x, u[:, :-1], dim) < eps + 1e-9


def _tensors(b, c, o, groups, kh, kw, h, w, bias=True, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g, dtype=dtype)
    weight = torch.randn(o, c // groups, kh, kw, generator=g, dtype=dtype)
    bias_ = torch.randn(o, generator=g, dtype=dtype) if bias else None
    return x, weight, bias_


def _low_rank(shape, ranks, noise=1e-2, seed=0, dtype=F64):
    """A Tucker tensor of the given multilinear ranks, plus a little noise: low-rank-ish."""
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(ranks, generator=g, dtype=dtype)
    for dim, (size, rank) in enumerate(zip(shape, ranks, strict=True)):
        out = torch.movedim(torch.tensordot(out, torch.randn(size, rank, generator=g, dtype=dtype), dims=([dim], [1])),
                            -1, dim)
    return out + noise * torch.randn(shape, generator=g, dtype=dtype)


def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider map: contiguous in no format
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


# --------------------------------------------------------------------------------------------
# Convolution: lossless at ε = 1 over many geometries


@st.composite
def conv_cases(draw):
    groups_kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    per_group = draw(st.integers(1, 3))
    groups = {"dense": 1, "grouped": draw(st.integers(2, 3)), "depthwise": draw(st.integers(2, 5))}[groups_kind]
    c = groups * (1 if groups_kind == "depthwise" else per_group)
    o = groups * draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    kind = draw(st.sampled_from(["int", "pair", "asymmetric", "same", "valid"]))
    if kind == "same":
        stride = (1, 1)
        padding, pad_h, pad_w = "same", dilation[0] * (kh - 1), dilation[1] * (kw - 1)
    elif kind == "int":
        padding = draw(st.integers(0, 2))
        pad_h = pad_w = 2 * padding
    elif kind == "pair":
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        pad_h, pad_w = 2 * padding[0], 2 * padding[1]
    elif kind == "asymmetric":
        padding = tuple(draw(st.integers(0, 3)) for _ in range(4))
        pad_h, pad_w = padding[2] + padding[3], padding[0] + padding[1]
    else:
        padding, pad_h, pad_w = "valid", 0, 0
    h = draw(st.integers(max(1, dilation[0] * (kh - 1) + 1 - pad_h), 9))
    w = draw(st.integers(max(1, dilation[1] * (kw - 1) + 1 - pad_w), 9))
    return dict(
        shape=dict(b=draw(st.integers(1, 3)), c=c, o=o, groups=groups, kh=kh, kw=kw, h=h, w=w,
                   bias=draw(st.booleans()), seed=draw(st.integers(0, 1000))),
        args=(stride, padding, dilation, groups),
        mode=draw(st.sampled_from(MODES)),
    )


def _check_conv_against_dense(x, weight, bias, args, mode, eps=1.0):
    """hosvd_conv2d's y, grad_X, grad_W and grad_bias equal dense autograd of F.conv2d at eps = 1."""
    fx, fw, fb = leaf(x), leaf(weight), leaf(bias)
    rx, rw, rb = leaf(x), leaf(weight), leaf(bias)
    y = facto.hosvd_conv2d(fx, fw, fb, *args, eps=eps, mode=mode)
    y_ref = _dense_conv(rx, rw, rb, *args)
    torch.testing.assert_close(y, y_ref)
    grad_y = torch.randn_like(y_ref)
    y.backward(grad_y)
    y_ref.backward(grad_y)
    torch.testing.assert_close(fx.grad, rx.grad)
    torch.testing.assert_close(fw.grad, rw.grad)
    if bias is not None:
        torch.testing.assert_close(fb.grad, rb.grad)


@settings(max_examples=60, deadline=None)
@given(case=conv_cases())
def test_property_lossless_grads_match_dense(case):
    """ε = 1: every gradient is dense autograd's, for strides, int / pair / asymmetric / "same" / "valid"
    padding, dilation, groups (depthwise included), batch 1, odd sizes, both modes."""
    x, weight, bias = _tensors(**case["shape"])
    _check_conv_against_dense(x, weight, bias, case["args"], case["mode"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_lossless_for_every_layout(mode, layout):
    x, weight, bias = _tensors(2, 6, 4, 2, 3, 2, 7, 5, seed=3)
    _check_conv_against_dense(_layout(x, layout), weight, bias, ((2, 1), (1, 0, 2, 1), (1, 2), 2), mode)


NAMED_GEOMETRIES = {  # (b, c, o, groups, kh, kw, h, w), (stride, padding, dilation, groups)
    "stride-equals-dilation": ((2, 4, 6, 1, 3, 3, 11, 9), ((2, 2), (1, 2, 0, 3), (2, 2), 1)),
    "batch1-odd-sizes": ((1, 3, 5, 1, 3, 1, 7, 5), ((1, 3), (2, 1), (1, 1), 1)),
    "depthwise-same-even-kernel": ((2, 5, 10, 5, 2, 4, 6, 7), ((1, 1), "same", (1, 2), 5)),
    "pointwise-valid": ((3, 4, 2, 2, 1, 1, 5, 5), ((2, 1), "valid", (1, 1), 2)),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMED_GEOMETRIES)
def test_lossless_named_geometries(name, mode):
    """The cases the public reference code got wrong, always run: stride = dilation, one-sided and "same"
    padding, depthwise weight gradients, batch 1."""
    shape, args = NAMED_GEOMETRIES[name]
    b, c, o, groups, kh, kw, h, w = shape
    x, weight, bias = _tensors(b, c, o, groups, kh, kw, h, w, seed=11)
    _check_conv_against_dense(x, weight, bias, args, mode)


def test_grouped_projection_path_lossless():
    """groups = 2 with the channel rank below a group's width: the correlation runs in K_C space and each
    group's output channels are projected with that group's rows of U_C."""
    x = _low_rank((3, 8, 6, 6), (3, 2, 6, 6), noise=0.0, seed=4)
    weight = torch.randn(4, 4, 3, 3, dtype=F64)
    args = ((1, 1), (1, 2, 0, 1), (1, 1), 2)
    _, codes = torch.ops.facto.hosvd_conv2d(x, weight, None, [1, 1], [1, 2, 0, 1], [1, 1], 2, 1.0, "hosvd")
    assert codes[2].shape[1] <= 4  # K_C ≤ channels per group
    _check_conv_against_dense(x, weight, None, args, "hosvd")


# --------------------------------------------------------------------------------------------
# Convolution: ε < 1


CONV_GEOMETRIES = [
    ((1, 1), (1, 1), (1, 1), 1),
    ((2, 1), (0, 2, 1, 0), (1, 2), 1),
    ((1, 1), "same", (2, 1), 2),
    ((2, 2), (1, 0), (1, 1), 6),  # depthwise
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("eps", [0.5, 0.8, 0.95])
@pytest.mark.parametrize("geometry", range(len(CONV_GEOMETRIES)))
def test_lossy_grad_w_is_that_of_the_reconstruction(mode, eps, geometry):
    """grad_W is autograd's grad_W of F.conv2d(X̂) with X̂ rebuilt from the saved codes; grad_X and
    grad_bias stay exact (dense autograd on X); every mode keeps ≥ eps of its energy, minimally."""
    stride, padding, dilation, groups = CONV_GEOMETRIES[geometry]
    x, weight, bias = _tensors(4, 6, 6, groups, 3, 3, 9, 8, seed=geometry)
    pads = facto.conv_padding(padding, (3, 3), list(stride), list(dilation))
    fx, fw, fb = leaf(x), leaf(weight), leaf(bias)
    y, codes = torch.ops.facto.hosvd_conv2d(fx, fw, fb, list(stride), pads, list(dilation), groups, eps, mode)
    grad_y = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, [fx, fw, fb], grad_y)

    rx, rw, rb = leaf(x), leaf(weight), leaf(bias)
    ref = _dense_conv(rx, rw, rb, stride, padding, dilation, groups)
    torch.testing.assert_close(y, ref)
    ref_gx, ref_gb = torch.autograd.grad(ref, [rx, rb], grad_y)
    x_hat = _rebuilt(codes, mode, "conv")
    (ref_gw,) = torch.autograd.grad(_dense_conv(x_hat, rw, None, stride, padding, dilation, groups), [rw], grad_y)
    torch.testing.assert_close(gx, ref_gx)
    torch.testing.assert_close(gb, ref_gb)
    torch.testing.assert_close(gw, ref_gw)
    _check_energy(x, codes, mode, eps)
    if eps == 0.5:  # the truncation is real
        assert any(u.shape[1] < u.shape[0] for u in _factors(codes, mode))


@pytest.mark.parametrize("mode", MODES)
def test_zero_input_keeps_rank_one_and_zero_grads(mode):
    x = torch.zeros(2, 3, 5, 5, dtype=F64, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, dtype=F64, requires_grad=True)
    y, codes = torch.ops.facto.hosvd_conv2d(x, weight, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, 0.8, mode)
    assert all(u.shape[1] == 1 for u in _factors(codes, mode))
    (gw,) = torch.autograd.grad(y, [weight], torch.randn_like(y))
    assert torch.equal(gw, torch.zeros_like(gw))


def test_first_layer_and_frozen_weight():
    """An input that needs no grad still gets the lossless grad_W; a frozen weight still gives grad_X."""
    x, weight, bias = _tensors(2, 3, 4, 1, 3, 3, 6, 6, seed=5)
    args = ((1, 1), 1, (1, 1), 1)
    fw, rw = leaf(weight), leaf(weight)
    grad_y = torch.randn(2, 4, 6, 6, dtype=F64)
    (gw,) = torch.autograd.grad(facto.hosvd_conv2d(x, fw, bias, *args, eps=1.0), [fw], grad_y)
    (ref,) = torch.autograd.grad(_dense_conv(x, rw, bias, *args), [rw], grad_y)
    torch.testing.assert_close(gw, ref)
    fx, rx = leaf(x), leaf(x)
    (gx,) = torch.autograd.grad(facto.hosvd_conv2d(fx, weight, bias, *args, eps=0.5), [fx], grad_y)
    (ref,) = torch.autograd.grad(_dense_conv(rx, weight, bias, *args), [rx], grad_y)
    torch.testing.assert_close(gx, ref)


def test_no_grad_path_is_a_plain_conv():
    x, weight, bias = _tensors(2, 4, 4, 2, 2, 3, 7, 6, seed=6)
    weight.requires_grad_(True)
    with torch.no_grad():
        y = facto.hosvd_conv2d(x, weight, bias, 1, (1, 0, 0, 1), 2, 2)
    assert not y.requires_grad
    torch.testing.assert_close(y, _dense_conv(x, weight.detach(), bias, 1, (1, 0, 0, 1), 2, 2))
    saved = _saved(lambda: facto.hosvd_conv2d(x, weight.detach(), bias, 1, 1, 1, 2))
    assert saved == []


@pytest.mark.parametrize(
    ("padding", "stride", "message"),
    [("same", 2, "strided"), ("full", 1, "'same' or 'valid'"), ((1, 2, 3), 1, "left, right, top, bottom")],
)
def test_bad_padding_is_refused(padding, stride, message):
    with pytest.raises(ValueError, match=message):
        facto.conv_padding(padding, (3, 3), [stride, stride], [1, 1])


def test_bad_eps_and_mode_are_refused():
    x, weight, _ = _tensors(1, 2, 2, 1, 1, 1, 3, 3)
    with pytest.raises(ValueError, match="eps"):
        facto.hosvd_conv2d(x, weight, eps=0.0)
    with pytest.raises(ValueError, match="mode"):
        facto.hosvd_linear(x.flatten(1), weight.flatten(1).T, mode="tucker")


# --------------------------------------------------------------------------------------------
# Linear


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lead", [(6,), (1,), (2, 5)], ids=["rows", "batch1", "BxT"])
@pytest.mark.parametrize("eps", [1.0, 0.7])
def test_linear_against_dense(mode, lead, eps):
    """grad_x, grad_bias exact; grad_W = autograd of F.linear(X̂) (= dense at eps = 1); energies ≥ eps."""
    g = torch.Generator().manual_seed(len(lead))
    x = torch.randn(*lead, 9, generator=g, dtype=F64)
    weight, bias = torch.randn(4, 9, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    fx, fw, fb = leaf(x), leaf(weight), leaf(bias)
    y, codes = torch.ops.facto.hosvd_linear(fx, fw, fb, eps, mode)
    grad_y = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, [fx, fw, fb], grad_y)
    rx, rw, rb = leaf(x), leaf(weight), leaf(bias)
    ref = F.linear(rx, rw, rb)
    torch.testing.assert_close(y, ref)
    ref_gx, ref_gw, ref_gb = torch.autograd.grad(ref, [rx, rw, rb], grad_y)
    torch.testing.assert_close(gx, ref_gx)
    torch.testing.assert_close(gb, ref_gb)
    rows = x.reshape(-1, 9)
    x_hat = _rebuilt(codes, mode, "linear")
    (hat_gw,) = torch.autograd.grad(F.linear(x_hat, rw), [rw], grad_y.reshape(-1, 4))
    torch.testing.assert_close(gw, hat_gw)
    if eps == 1.0:
        torch.testing.assert_close(gw, ref_gw)
    _check_energy(rows, codes, mode, eps)


def test_linear_wrapper_and_no_grad():
    x = torch.randn(3, 2, 5, requires_grad=True)
    weight, bias = torch.randn(4, 5, requires_grad=True), torch.randn(4, requires_grad=True)
    y = facto.hosvd_linear(x, weight, bias, eps=1.0)
    y.sum().backward()
    with torch.no_grad():
        y0 = facto.hosvd_linear(x, weight, bias)
    assert not y0.requires_grad
    torch.testing.assert_close(y0, F.linear(x, weight, bias))
    torch.testing.assert_close(weight.grad, torch.ones(6, 4).T @ x.detach().reshape(6, 5))


# --------------------------------------------------------------------------------------------
# 16-bit inputs, autocast, layouts


def _autocast(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _rel(a, b):
    a, b = a.to(F64), b.to(F64)
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
PRECISION_CASES = [
    pytest.param(dtype, None, id=str(dtype).removeprefix("torch.")) for dtype in TOLERANCE
] + [pytest.param(torch.float32, torch.bfloat16, id="autocast-bf16")]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize(("dtype", "autocast"), PRECISION_CASES)
def test_conv_low_precision_and_autocast(mode, layout, dtype, autocast):
    """y and the codes take (autocast) x's dtype, grads the inputs' dtypes; values agree with a float64
    reference on the same rounded inputs: grad_X and grad_bias with X, grad_W with X̂ from the codes."""
    x = _layout(_low_rank((3, 6, 7, 5), (2, 3, 4, 3), noise=0.1, seed=7, dtype=torch.float32).to(dtype), layout)
    weight, bias = torch.randn(6, 3, 3, 2), torch.randn(6)  # fp32 parameters
    fx, fw, fb = leaf(x), leaf(weight), leaf(bias)
    pads = [1, 0, 1, 1]
    with _autocast(autocast):
        y, codes = torch.ops.facto.hosvd_conv2d(fx, fw, fb, [1, 2], pads, [1, 1], 2, 0.8, mode)
    run_dtype = autocast or dtype
    assert y.dtype == run_dtype and all(c.dtype == run_dtype for c in codes[:-1])
    assert codes[-1].dtype == torch.float32 and codes[-1].item() == 1  # the scale: 1 where the core fits
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, [fx, fw, fb], grad_y)
    assert (gx.dtype, gw.dtype, gb.dtype) == (dtype, torch.float32, torch.float32)

    # float64 references on the rounded tensors the op saw
    x64, w64, b64 = x.to(run_dtype).to(F64), weight.to(run_dtype).to(F64), bias.to(run_dtype).to(F64)
    rx, rw, rb = leaf(x64), leaf(w64), leaf(b64)
    ref = _dense_conv(rx, rw, rb, (1, 2), tuple(pads), (1, 1), 2)
    tol = TOLERANCE[run_dtype]
    assert _rel(y, ref) < tol
    ref_gx, ref_gb = torch.autograd.grad(ref, [rx, rb], grad_y.to(F64))
    x_hat = _rebuilt([c.to(F64) for c in codes], mode, "conv")
    (ref_gw,) = torch.autograd.grad(_dense_conv(x_hat, rw, None, (1, 2), tuple(pads), (1, 1), 2), [rw], grad_y.to(F64))
    assert _rel(gx, ref_gx) < tol
    assert _rel(gb, ref_gb) < tol
    assert _rel(gw, ref_gw) < tol
    if run_dtype == torch.float32:
        _check_energy(x64, codes, mode, 0.8 - 1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("dtype", "autocast"), PRECISION_CASES)
def test_linear_low_precision_and_autocast(mode, dtype, autocast):
    x = torch.randn(2, 5, 8).to(dtype)
    weight, bias = torch.randn(3, 8), torch.randn(3)
    fx, fw, fb = leaf(x), leaf(weight), leaf(bias)
    with _autocast(autocast):
        y, codes = torch.ops.facto.hosvd_linear(fx, fw, fb, 0.8, mode)
    run_dtype = autocast or dtype
    assert y.dtype == run_dtype and all(c.dtype == run_dtype for c in codes[:-1])
    assert codes[-1].dtype == torch.float32 and codes[-1].item() == 1  # the scale: 1 where the core fits
    grad_y = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, [fx, fw, fb], grad_y)
    assert (gx.dtype, gw.dtype, gb.dtype) == (dtype, torch.float32, torch.float32)
    x64, w64 = x.to(run_dtype).to(F64), weight.to(run_dtype).to(F64)
    tol = TOLERANCE[run_dtype]
    g64 = grad_y.to(F64).reshape(-1, 3)
    assert _rel(gx, (g64 @ w64).view(2, 5, 8)) < tol
    assert _rel(gb, g64.sum(0)) < tol
    assert _rel(gw, g64.T @ _rebuilt([c.to(F64) for c in codes], mode, "linear")) < tol
    del x64


# --------------------------------------------------------------------------------------------
# Fakes, opcheck, torch.compile


def _fake_run(op, args):
    with FakeTensorMode(shape_env=ShapeEnv(allow_dynamic_output_shape_ops=True)) as mode:
        fake_args = [mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a for a in args]
        return op(*fake_args)


def _agree(real, fake):
    """y agrees exactly; each code in dtype, dims and every size that is not a rank (ranks: unbacked)."""
    y, codes = real
    fake_y, fake_codes = fake
    assert (y.dtype, tuple(y.shape), y.stride()) == (fake_y.dtype, tuple(fake_y.shape), fake_y.stride())
    assert len(codes) == len(fake_codes)
    for code, fake_code in zip(codes, fake_codes, strict=True):
        assert code.dtype == fake_code.dtype and code.dim() == fake_code.dim()
        for size, fake_size in zip(code.shape, fake_code.shape, strict=True):
            assert size == fake_size if isinstance(fake_size, int) else 1 <= size


CONTRACT = pytest.mark.parametrize(
    ("dtype", "layout", "autocast"),
    [(dtype, layout, autocast) for dtype in (torch.float32, torch.bfloat16, torch.float16)
     for layout in ("contiguous", "channels_last", "strided") for autocast in (None, torch.bfloat16)],
)


@CONTRACT
@pytest.mark.parametrize("mode", MODES)
def test_fakes_agree_with_real_outputs(mode, dtype, layout, autocast):
    x = _layout(torch.randn(2, 4, 6, 5).to(dtype), layout).requires_grad_()
    weight, bias = torch.randn(6, 2, 3, 3, requires_grad=True), torch.randn(6, requires_grad=True)
    conv = (x, weight, bias, [1, 1], [0, 1, 1, 1], [1, 1], 2, 0.8, mode)
    linear = (x.flatten(2), torch.randn(3, 30, requires_grad=True), None, 0.8, mode)
    with _autocast(autocast):
        for op, args in [(torch.ops.facto.hosvd_conv2d.default, conv), (torch.ops.facto.hosvd_linear.default, linear)]:
            real = op(*args)
            _agree(real, _fake_run(op, args))
            assert real[0].dtype == (autocast or dtype)


OPCHECK_CASES = [
    ("hosvd", "contiguous", [1, 1], [1, 1, 1, 1], 1),
    ("svd", "channels_last", [2, 1], [0, 2, 1, 0], 2),
    ("hosvd", "channels_last", [1, 1], [1, 1, 0, 0], 4),
]


@pytest.mark.parametrize(("mode", "layout", "stride", "pads", "groups"), OPCHECK_CASES)
def test_opcheck_conv(mode, layout, stride, pads, groups):
    x = _layout(torch.randn(2, 4, 6, 6), layout).requires_grad_()
    weight, bias = torch.randn(4, 4 // groups, 3, 2, requires_grad=True), torch.randn(4, requires_grad=True)
    args = (x, weight, bias, stride, pads, [1, 1], groups, 0.8, mode)
    torch.library.opcheck(torch.ops.facto.hosvd_conv2d.default, args)
    y, codes = torch.ops.facto.hosvd_conv2d(*args)
    grad_args = (torch.randn_like(y), [c.detach() for c in codes], list(weight.shape), stride, pads, [1, 1], groups,
                 mode)
    torch.library.opcheck(torch.ops.facto.hosvd_conv2d_weight_grad.default, grad_args)


@pytest.mark.parametrize("mode", MODES)
def test_opcheck_linear(mode):
    x = torch.randn(2, 3, 7, requires_grad=True)
    weight, bias = torch.randn(4, 7, requires_grad=True), torch.randn(4, requires_grad=True)
    torch.library.opcheck(torch.ops.facto.hosvd_linear.default, (x, weight, bias, 0.8, mode))


def test_compiles_with_unbacked_ranks():
    """fullgraph torch.compile (aot_eager: fakes and autograd traced, no codegen) gives eager's gradients."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, 6, requires_grad=True)
    weight, lin = torch.randn(6, 2, 3, 3, requires_grad=True), torch.randn(5, 6 * 36, requires_grad=True)

    def step(x, weight, lin):
        y = facto.hosvd_conv2d(x, weight, None, 1, "same", 1, 2, eps=0.8, mode="hosvd")
        return facto.hosvd_linear(y.relu().flatten(1), lin, eps=0.9, mode="svd").square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x, weight, lin), [x, weight, lin])
    want = torch.autograd.grad(step(x, weight, lin), [x, weight, lin])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


# --------------------------------------------------------------------------------------------
# Saved bytes, helpers


def _saved_bytes(fn, *params):
    """Bytes of the unique storages autograd saves while fn runs, parameters excluded (docs/design.md §5)."""
    excluded = {p.untyped_storage().data_ptr() for p in params if p is not None}
    storages = {}
    for t in _saved(fn):
        if t.untyped_storage().data_ptr() not in excluded:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values()), len(storages)


@pytest.mark.parametrize("mode", MODES)
def test_saves_less_than_x_on_a_low_rank_input(mode):
    x = _low_rank((8, 16, 12, 12), (2, 4, 5, 5), seed=8, dtype=torch.float32).requires_grad_()
    weight, bias = torch.randn(16, 16, 3, 3, requires_grad=True), torch.randn(16, requires_grad=True)
    nbytes, count = _saved_bytes(lambda: facto.hosvd_conv2d(x, weight, bias, 1, 1, eps=0.8, mode=mode), weight, bias)
    codes = facto.decompose(x, 0.8, mode)
    assert count == len(codes)
    assert nbytes == sum(c.untyped_storage().nbytes() for c in codes)
    assert nbytes < x.untyped_storage().nbytes() / (20 if mode == "hosvd" else 3)

    rows = _low_rank((64, 48), (4, 4), seed=9, dtype=torch.float32).requires_grad_()
    lin = torch.randn(10, 48, requires_grad=True)
    nbytes, _ = _saved_bytes(lambda: facto.hosvd_linear(rows, lin, eps=0.8, mode=mode), lin)
    assert nbytes < rows.untyped_storage().nbytes() / 3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_decompose_reconstruct_and_rank_report(mode, layout):
    x = _layout(_low_rank((4, 5, 6, 7), (2, 3, 3, 4), noise=0.05, seed=10), layout)
    codes = facto.decompose(x, 1.0, mode)
    torch.testing.assert_close(facto.reconstruct(codes), x)
    codes = facto.decompose(x, 0.9, mode)
    torch.testing.assert_close(facto.reconstruct(codes), _rebuilt(codes, mode, "conv"))
    report = facto.rank_report(x, 0.9, mode)
    factors = _factors(codes, mode)
    assert [(r.dim, r.size, r.rank) for r in report] == [
        (d, x.shape[d], u.shape[1]) for d, u in zip(_factor_dims(mode, 4), factors, strict=True)
    ]
    for r, u in zip(report, factors, strict=True):
        assert r.kept >= 0.9
        assert r.kept == pytest.approx(_kept(x, u, r.dim), abs=1e-9)


# --------------------------------------------------------------------------------------------
# Rank-deficient fp32 inputs: finite codes and correct gradients, at 1 and 2 threads


@contextlib.contextmanager
def _threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sparse_relu(b, c, seed):
    """A post-ReLU b×c×1×1 map with most channels dead: rank ≤ b, hundreds of zero channels. With one thread
    fp32 eigh of its c×c channel Gram returns NaN without raising for seed 4 and raises for seed 2 (2 threads:
    raises for seed 2)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, 1, 1, generator=g) - 1.5).relu()


def _spatially_constant(b, c, size, seed):
    """_sparse_relu(b, c) repeated over a size × size map, so that b·size² = c: the c×c channel Gram is the one
    solved (no dual), of rank ≤ b. Here fp32 eigh raises on it for (4, 64, 4, seed=2) and returns NaN without
    raising for (8, 128, 4, seed=2) with one thread: the fp64 fallback is what keeps these finite."""
    return _sparse_relu(b, c, seed).expand(b, c, size, size).contiguous()


def _randn(*shape, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(12)) * scale


RANK_DEFICIENT = {  # fp32 inputs; "dual": a mode longer than the product of the others
    "issue-8x512x1x1-nan": lambda: _sparse_relu(8, 512, seed=4),
    "issue-8x512x1x1-raises": lambda: _sparse_relu(8, 512, seed=2),
    "batch-below-channels-1x1": lambda: _randn(4, 64, 1, 1),
    "batch-above-chw": lambda: _randn(16, 3, 1, 1),  # SVD's batch mode is dual
    "tall-map": lambda: _randn(1, 2, 40, 3),  # H = 40 > 1·2·3
    "spatially-constant-raises": lambda: _spatially_constant(4, 64, 4, seed=2),
    "spatially-constant-nan": lambda: _spatially_constant(8, 128, 4, seed=2),
    "constant": lambda: torch.full((3, 8, 5, 5), 0.7),
    "zero": lambda: torch.zeros(2, 16, 3, 3),
    "huge": lambda: _randn(2, 6, 5, 5, scale=1e20),  # x² overflows fp32
    "tiny": lambda: _randn(2, 6, 5, 5, scale=1e-25),  # x² underflows fp32
}


def _rel_error(a, b):
    return ((a.to(F64) - b).norm() / b.norm()).item()


def _check_rank_deficient_conv(x, mode):
    """Codes finite; at ε = 1 grad_W is float64 dense autograd's (fp32 rounding), at ε = 0.8 that of X̂
    rebuilt from the codes; an all-zero map gives a zero grad_W."""
    weight = torch.randn(4, x.shape[1], 3, 3, generator=torch.Generator().manual_seed(13))
    grad_y = torch.randn(x.shape[0], 4, *x.shape[2:], generator=torch.Generator().manual_seed(14))
    for eps in (1.0, 0.8):
        fw = leaf(weight)
        y, codes = torch.ops.facto.hosvd_conv2d(x, fw, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, eps, mode)
        assert all(torch.isfinite(c).all() for c in codes)
        (gw,) = torch.autograd.grad(y, [fw], grad_y)
        assert torch.isfinite(gw).all()
        if not x.any():
            assert torch.equal(gw, torch.zeros_like(gw))
            continue
        x_hat = _rebuilt([c.to(F64) for c in codes], mode, "conv")
        rw = leaf(weight.to(F64))
        (ref,) = torch.autograd.grad(F.conv2d(x.to(F64) if eps == 1.0 else x_hat, rw, padding=1), [rw], grad_y.to(F64))
        assert _rel_error(gw, ref) < 1e-5
        if eps == 1.0:
            assert _rel_error(x_hat, x.to(F64)) < 1e-5
        else:
            _check_energy(x, codes, mode, eps - 1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", RANK_DEFICIENT)
def test_rank_deficient_inputs_give_finite_codes_and_exact_grads(name, mode, threads):
    """The issue: fp32 eigh of the 512×512 channel Gram of an 8×512×1×1 map (rank ≤ 8) returned NaN without
    raising, so the codes and grad_W were NaN. Low-rank maps, constant and all-zero maps, and scales whose
    squares leave fp32's range keep every code finite and grad_W exact at ε = 1."""
    with _threads(threads):
        _check_rank_deficient_conv(RANK_DEFICIENT[name](), mode)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", MODES)
def test_linear_rank_deficient_rows(mode, threads):
    """A linear layer's 8 × 512 rows (the issue's map, flattened): its feature mode takes the 8×8 dual Gram."""
    x = _sparse_relu(8, 512, seed=4).flatten(1)
    weight = torch.randn(5, 512, generator=torch.Generator().manual_seed(15))
    grad_y = torch.randn(8, 5, generator=torch.Generator().manual_seed(16))
    with _threads(threads):
        fw = leaf(weight)
        y, codes = torch.ops.facto.hosvd_linear(x, fw, None, 1.0, mode)
        (gw,) = torch.autograd.grad(y, [fw], grad_y)
    assert all(torch.isfinite(c).all() for c in codes)
    assert _rel_error(gw, grad_y.to(F64).T @ x.to(F64)) < 1e-5
    _check_energy(x, codes, mode, 1.0 - 1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_dual_modes_keep_the_rank_bound_and_orthonormal_factors(mode):
    """A mode longer than the product of the others gets at most that many orthonormal columns."""
    x = _randn(3, 50, 2, 1)  # C = 50 > 3·2·1
    for eps in (1.0, 0.9):
        codes = facto.decompose(x, eps, mode)
        for dim, u in zip(_factor_dims(mode, 4), _factors(codes, mode), strict=True):
            assert u.shape[1] <= x.numel() // x.shape[dim]
        _check_energy(x, codes, mode, eps - 1e-5)
    assert _rel_error(facto.reconstruct(facto.decompose(x, 1.0, mode)), x.to(F64)) < 1e-5


def _failing_fp32_eigh(monkeypatch, how):
    """torch.linalg.eigh failing on fp32 Grams as the solver does (NaN without raising, or raising); the
    fp64 calls it lets through are counted."""
    real, calls = torch.linalg.eigh, []

    def eigh(a, *args, **kwargs):
        calls.append(a.dtype)
        values, vectors = real(a, *args, **kwargs)
        if a.dtype != torch.float32:
            return values, vectors
        if how == "raises":
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge (error code: 7).")
        return torch.full_like(values, float("nan")), torch.full_like(vectors, float("nan"))

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    return calls


@pytest.mark.parametrize("how", ["nan", "raises"])
@pytest.mark.parametrize("mode", MODES)
def test_failed_fp32_eigh_is_solved_again_in_fp64(monkeypatch, how, mode):
    """A mode whose fp32 spectrum is not finite (or whose solver raises) is solved in fp64: finite codes, the
    same ranks as an fp32 solve that worked, lossless at ε = 1 (primal and dual modes)."""
    x = _randn(2, 30, 3, 3)  # C = 30 > 2·3·3: dual; B, H, W: primal
    want = [r.rank for r in facto.rank_report(x, 0.9, mode)]
    calls = _failing_fp32_eigh(monkeypatch, how)
    assert [r.rank for r in facto.rank_report(x, 0.9, mode)] == want
    codes = facto.decompose(x, 1.0, mode)
    assert torch.float64 in calls and all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in codes)
    assert _rel_error(facto.reconstruct(codes), x.to(F64)) < 1e-5
    _check_rank_deficient_conv(x, mode)


@pytest.mark.parametrize("threads", [1, 2])
def test_real_fp32_eigh_failures_are_solved_in_fp64(monkeypatch, threads):
    """The spatially constant maps above, with eigh only watched: wherever fp32 eigh really failed (raised, or
    returned non-finite values), an fp64 solve followed, and the codes are finite and lossless at ε = 1."""
    real, outcomes = torch.linalg.eigh, []

    def eigh(a, *args, **kwargs):
        try:
            values, vectors = real(a, *args, **kwargs)
        except torch.linalg.LinAlgError:
            outcomes.append((a.dtype, False))
            raise
        outcomes.append((a.dtype, bool(torch.isfinite(values).all() and torch.isfinite(vectors).all())))
        return values, vectors

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    for x in (_spatially_constant(4, 64, 4, seed=2), _spatially_constant(8, 128, 4, seed=2)):
        outcomes.clear()
        with _threads(threads):
            codes = facto.decompose(x, 1.0, "hosvd")
        assert all(torch.isfinite(c).all() for c in codes)
        assert _rel_error(_rebuilt([c.to(F64) for c in codes], "hosvd", "conv"), x.to(F64)) < 1e-5
        if (torch.float32, False) in outcomes:
            assert (torch.float64, True) in outcomes


# --------------------------------------------------------------------------------------------
# 16-bit maps whose norm leaves fp16's range: the core (or R) must still fit the storage dtype


def _uniform_400():
    """Modest, finite fp16 values (≤ 400) whose Frobenius norm, about 8.4e4, exceeds fp16's 65504: the HOSVD
    core concentrates the energy, its top entry is about ‖X‖_F."""
    return torch.rand(8, 64, 16, 16, generator=torch.Generator().manual_seed(17)) * 400


def _outlier_channel():
    """_uniform_400 with one position of one channel at 3e4 in every sample: σ_1 ≈ 3e4·√8 ≈ 8.5e4, so SVD's R,
    whose entries reach σ_1, leaves fp16's range too."""
    x = _uniform_400()
    x[:, 0, 0, 0] = 3e4
    return x


WIDE_NORM = {"uniform-400": _uniform_400, "outlier-channel": _outlier_channel}
WIDE_NORM_DTYPES = pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])


def _check_wide_norm(op, x, weight, grad_y, args, ref_grad_w):
    """Codes, y, grad_X and grad_W finite; grad_W within 16-bit rounding of float64 dense autograd at ε = 1, and
    so is X̂ rebuilt by `reconstruct`. Only fp16 needs a scale (bf16 has fp32's range)."""
    fx, fw = leaf(x), leaf(weight)
    y, codes = op(fx, fw, None, *args)
    assert all(torch.isfinite(c).all() for c in codes)
    assert (codes[-1].item() > 1) == (x.dtype == torch.float16)
    assert torch.isfinite(y).all()
    gx, gw = torch.autograd.grad(y, [fx, fw], grad_y)
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all()
    assert _rel(gw, ref_grad_w) < TOLERANCE[x.dtype]
    assert _rel(facto.reconstruct(codes).reshape(x.shape), x) < TOLERANCE[x.dtype]


@WIDE_NORM_DTYPES
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", WIDE_NORM)
def test_conv_norm_beyond_fp16_range_keeps_codes_finite(name, mode, dtype):
    """The issue: an fp16 map with ‖X‖_F > 65504 gave an inf core, so inf codes and an inf / NaN grad_W. bf16
    (fp32's range) is checked alongside."""
    x = WIDE_NORM[name]().to(dtype)
    weight = torch.randn(4, 64, 3, 3, generator=torch.Generator().manual_seed(18)) / 24  # fp32, std 1/√fan_in
    grad_y = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(19)).to(dtype)
    rw = leaf(weight.to(F64))
    (ref,) = torch.autograd.grad(F.conv2d(x.to(F64), rw, padding=1), [rw], grad_y.to(F64))
    _check_wide_norm(torch.ops.facto.hosvd_conv2d, x, weight, grad_y, ([1, 1], [1, 1, 1, 1], [1, 1], 1, 1.0, mode),
                     ref)


@WIDE_NORM_DTYPES
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", WIDE_NORM)
def test_linear_norm_beyond_fp16_range_keeps_codes_finite(name, mode, dtype):
    """The same maps channels-last as a linear layer's 2048 rows × 64 features."""
    x = WIDE_NORM[name]().permute(0, 2, 3, 1).to(dtype)
    weight = torch.randn(5, 64, generator=torch.Generator().manual_seed(20)) / 8
    grad_y = torch.randn(8, 16, 16, 5, generator=torch.Generator().manual_seed(21)).to(dtype)
    ref = grad_y.to(F64).reshape(-1, 5).T @ x.to(F64).reshape(-1, 64)
    _check_wide_norm(torch.ops.facto.hosvd_linear, x, weight, grad_y, (1.0, mode), ref)
