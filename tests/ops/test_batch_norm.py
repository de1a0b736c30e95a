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
    kept = [t for t in _excluding(saved, weight, mean, var) if t.numel()]  # (empty: no codes' statistics)
    assert [(t.dtype, tuple(t.shape)) for t in kept] == [(dtype, (2, 3, 3, 4))]


def test_no_grad_path_matches():
    x, mean, var, weight, bias = _inputs((2, 3, 4, 4), seed=4)
    with torch.no_grad():
        y = facto.batch_norm(x, mean, var, leaf(weight), bias, eps=EPS)
    torch.testing.assert_close(y, F.batch_norm(x, mean, var, weight, bias, training=False, eps=EPS))


def test_opcheck():
    x, mean, var, weight, bias = _inputs((2, 3, 5, 4), seed=5)
    args = (leaf(x), leaf(weight), leaf(bias), mean, var, EPS, 2, None, True, None, 256, None)
    torch.library.opcheck(torch.ops.facto.batch_norm.default, args)


# facto::batch_norm_stats: batch statistics, x̂ saved pooled.


def _stats_run(x, weight, bias, k, momentum=0.1, storage_dtype=None):
    """(y, grads of x, γ, β for a fixed grad_y, running mean, running var) of the facto op and of
    F.batch_norm(training=True), each on fresh leaves and fresh running statistics."""
    results = []
    for facto_op in (True, False):
        leaves = [leaf(t) for t in (x, weight, bias)]
        running = (torch.zeros(x.shape[1], dtype=F64), torch.ones(x.shape[1], dtype=F64))
        if facto_op:
            y = facto.batch_norm_stats(leaves[0], *running, leaves[1], leaves[2], momentum, EPS, k, storage_dtype)
        else:
            y = F.batch_norm(leaves[0], *running, leaves[1], leaves[2], True, momentum, EPS)
        grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=y.dtype)
        results.append((y, _grads(y, leaves, grad_y), *running))
    return results


def _block_constant(shape, k, seed=0):
    """A map constant over each k×k window (the last ones partial): mean-pooling it loses nothing."""
    g = torch.Generator().manual_seed(seed)
    *lead, h, w = shape
    coarse = torch.randn(*lead, -(-h // k), -(-w // k), generator=g, dtype=F64)
    return coarse.repeat_interleave(k, -2).repeat_interleave(k, -1)[..., :h, :w].contiguous()


def _assert_all_close(got, expected, **tolerance):
    (y, grads, mean, var), (y_ref, grads_ref, mean_ref, var_ref) = got, expected
    torch.testing.assert_close(y, y_ref, **tolerance)
    for g, r in zip(grads, grads_ref, strict=True):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, **tolerance)
    torch.testing.assert_close(mean, mean_ref, **tolerance)
    torch.testing.assert_close(var, var_ref, **tolerance)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (4, 3), (2, 3, 5), (1, 3, 4, 4)], ids=["nchw", "bc", "bcl", "batch1"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_stats_exact_without_pooling(shape, affine, momentum):
    """k = 1 (and any k for non-4-D inputs): the output, every gradient and the running statistics
    are those of training-mode batch-norm."""
    x, _, _, weight, bias = _inputs(shape, affine=affine)
    k = 2 if len(shape) != 4 else 1
    _assert_all_close(*_stats_run(x, weight, bias, k, momentum), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("hw", [(6, 8), (5, 7), (1, 9)])
def test_stats_exact_when_pooling_loses_nothing(hw):
    """k = 2 on a map constant over each 2×2 window (odd sizes: partial windows): the upsampled
    pooled x̂ is x̂ itself, so every gradient is training-mode batch-norm's."""
    x = _block_constant((3, 4, *hw), 2)
    _, _, _, weight, bias = _inputs((3, 4, *hw), seed=1)
    _assert_all_close(*_stats_run(x, weight, bias, 2), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_stats_exact_over_many_pieces(layout):
    """A map whose gradient the CPU backward writes in several pieces of (sample, channel) planes
    (ops/chunks.py), constant over each 2×2 window: training-mode batch-norm's gradients."""
    shape = (3, 37, 64, 66)
    x = _block_constant(shape, 2, seed=4)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    _, _, _, weight, bias = _inputs(shape, seed=4)
    _assert_all_close(*_stats_run(x, weight, bias, 2), rtol=1e-10, atol=1e-10)


def test_stats_pooled_backward():
    """k = 2 on a general map: y, grad_β and the running statistics stay exact; grad_x keeps the
    exact backward's invariance to a per-channel shift (it sums to zero per channel); grad_γ is
    Σ sumpool_2(grad_y)·meanpool_2(x̂); and grad_x lies close to the exact one."""
    x, _, _, weight, bias = _inputs((4, 3, 8, 6), seed=2)
    (y, (gx, gw, gb), mean, var), (y_ref, (rgx, _, rgb), mean_ref, var_ref) = _stats_run(x, weight, bias, 2)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gb, rgb)
    torch.testing.assert_close(mean, mean_ref)
    torch.testing.assert_close(var, var_ref)
    torch.testing.assert_close(gx.sum((0, 2, 3)), torch.zeros(3, dtype=F64), atol=1e-12, rtol=0)
    x_hat = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True) + EPS)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    torch.testing.assert_close(gw, (_window_sum(grad_y, 2) * _window_sum(x_hat, 2) / 4).sum((0, 2, 3)))
    assert (gx - rgx).norm() < 0.5 * rgx.norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_stats_low_precision_and_layouts(dtype, layout):
    """Each dtype and layout against float64 training-mode batch-norm, at that dtype's precision;
    the output keeps x's dtype and memory format, γ's and β's gradients the parameters' fp32."""
    _, _, _, weight, bias = _inputs((2, 4, 6, 6), seed=3)
    x = _block_constant((2, 4, 6, 6), 2, seed=3).to(dtype)
    if layout == "strided":  # x sits in every other column of a wider map
        x = torch.stack([x, torch.randn_like(x)], -1).flatten(-2)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = leaf(x)
    source = x[..., ::2] if layout == "strided" else x  # every other column: contiguous in no format
    w, b = leaf(weight.float()), leaf(bias.float())
    running = (torch.zeros(4), torch.ones(4))
    y = facto.batch_norm_stats(source, *running, w, b, 0.1, EPS, 2)
    assert y.dtype == dtype
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    grads = torch.autograd.grad(y, (x, w, b), grad_y.to(dtype))
    assert [g.dtype for g in grads] == [dtype, torch.float32, torch.float32]

    ref_leaves = [leaf(x.detach().double()), leaf(weight), leaf(bias)]
    ref_source = ref_leaves[0][..., ::2] if layout == "strided" else ref_leaves[0]
    ref_running = (torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64))
    y_ref = F.batch_norm(ref_source, *ref_running, ref_leaves[1], ref_leaves[2], True, 0.1, EPS)
    grads_ref = torch.autograd.grad(y_ref, ref_leaves, grad_y)
    tolerance = {"rtol": 3e-2, "atol": 3e-2} if dtype != torch.float32 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(y.double(), y_ref, **tolerance)
    for g, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g.double(), r, **tolerance)
    for got, expected in zip(running, ref_running, strict=True):
        torch.testing.assert_close(got.double(), expected, **tolerance)


def test_stats_saves_only_pooled_x_hat():
    """What backward keeps of the map: x̂ pooled 2×2 in the storage dtype (plus per-channel vectors)."""
    x, _, _, weight, bias = _inputs((2, 3, 5, 7), seed=5)
    x, weight, bias = leaf(x), leaf(weight), leaf(bias)
    running = (torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64))
    saved = _saved(lambda: facto.batch_norm_stats(x, *running, weight, bias, 0.1, EPS, 2, torch.bfloat16))
    maps = [t for t in _excluding(saved, weight) if t.dim() > 1]
    assert [(t.dtype, tuple(t.shape)) for t in maps] == [(torch.bfloat16, (2, 3, 3, 4))]
    assert all(t.numel() <= 3 for t in _excluding(saved, weight) if t.dim() <= 1)


def test_stats_without_gradients_is_torch_training_batch_norm():
    """No gradient wanted: torch's training batch-norm runs, running statistics and all."""
    x, _, _, weight, bias = _inputs((2, 3, 4, 4), seed=6)
    running, expected = [(torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)) for _ in range(2)]
    with torch.no_grad():
        y = facto.batch_norm_stats(x, *running, leaf(weight), bias, 0.1, EPS)
    torch.testing.assert_close(y, F.batch_norm(x, *expected, weight, bias, True, 0.1, EPS))
    torch.testing.assert_close(running, expected)


def test_stats_one_value_per_channel_is_refused():
    x, _, _, weight, bias = _inputs((1, 3, 1, 1), seed=7)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        facto.batch_norm_stats(leaf(x), torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64), leaf(weight), bias)


def test_stats_opcheck():
    x, _, _, weight, bias = _inputs((2, 3, 5, 4), seed=8)
    args = (leaf(x), leaf(weight), leaf(bias), EPS, 2, None, None, 256, None)
    torch.library.opcheck(torch.ops.facto.batch_norm_stats.default, args)


# Either op with `bits`: the pooled x̂ kept as the fixed-rate store's codes.


def _pooled_x_hat_reference(x, k=2):
    """meanpool_k of training-mode x̂ (biased variance), from its definition, in float64."""
    dims = [d for d in range(x.dim()) if d != 1]
    x_hat = (x - x.mean(dims, keepdim=True)) / torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + EPS)
    return _window_sum(x_hat, k) / _window_sum(torch.ones_like(x_hat), k)


def _stats_grads(x, weight, bias, bits, seed=0):
    """Gradients of x, γ, β through batch_norm_stats (pooled 2×2) for a fixed grad_y, drawing codes
    with torch seeded by `seed`."""
    leaves = [leaf(t) for t in (x, weight, bias)]
    running = (torch.zeros(x.shape[1], dtype=x.dtype), torch.ones(x.shape[1], dtype=x.dtype))
    torch.manual_seed(seed)
    y = facto.batch_norm_stats(leaves[0], *running, leaves[1], leaves[2], 0.1, EPS, 2, bits=bits)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=y.dtype)
    return y, _grads(y, leaves, grad_y)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_stats_codes_decode_to_the_pooled_x_hat(bits):
    """What backward keeps: codes of the pooled x̂ (ceil(36·bits/8) bytes per sample of 3×3×4 pooled
    values) and a min and a scale per group; decoding them (the op's own dequantizer, tested against
    the format in test_quantized.py) gives meanpool_2(x̂) within one step of its group."""
    x, _, _, weight, bias = _inputs((2, 3, 5, 7), seed=10)
    x, weight, bias = leaf(x), leaf(weight), leaf(bias)
    running = (torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64))
    saved = _saved(lambda: facto.batch_norm_stats(x, *running, weight, bias, 0.1, EPS, 2, bits=bits, group=8))
    codes, mins, scales = [t for t in _excluding(saved, weight) if t.dim() == 1 and t.numel() > 3]
    assert codes.dtype == torch.uint8 and codes.numel() == 2 * -(-36 * bits // 8)
    assert mins.numel() == scales.numel() == 2 * -(-36 // 8)
    assert not [t for t in _excluding(saved, weight) if t.dim() > 1]  # no map besides the codes
    decoded = torch.ops.facto.dequantize_map(codes, mins, scales, bits, 8, [2, 3, 3, 4], False, F64)
    expected = _pooled_x_hat_reference(x.detach())
    step = scales.repeat_interleave(8)[: 36].view(1, 3, 3, 4)  # sample 0's steps, in its groups
    assert (decoded[0] - expected[0]).abs().le(step[0] * (1 + 1e-9)).all()


def test_stats_codes_give_unbiased_gradients():
    """Averaged over draws, 2-bit codes give the gradients of the uncoded pooled x̂ (which the tests
    above check against their formulas): the rounding is stochastic and unbiased. One draw's error
    is several times the mean's."""
    x, _, _, weight, bias = _inputs((4, 3, 8, 6), seed=11)
    _, exact = _stats_grads(x, weight, bias, None)
    draws = [_stats_grads(x, weight, bias, 2, seed)[1] for seed in range(200)]
    for i in (0, 1):  # grad_x, grad_γ (grad_β reads no map)
        mean = torch.stack([d[i] for d in draws]).mean(0)
        one = (draws[0][i] - exact[i]).norm()
        assert (mean - exact[i]).norm() < 0.25 * one
        assert (mean - exact[i]).norm() < 0.05 * exact[i].norm()
    torch.testing.assert_close(draws[0][2], exact[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_stats_codes_in_every_dtype_and_layout(dtype, layout):
    """8-bit codes against float64 training-mode batch-norm on a map pooling keeps whole: the output
    is exact (x's dtype and layout), every gradient within a few steps of 8-bit codes."""
    _, _, _, weight, bias = _inputs((2, 4, 6, 6), seed=12)
    x = _block_constant((2, 4, 6, 6), 2, seed=12).to(dtype)
    if layout == "strided":
        x = torch.stack([x, torch.randn_like(x)], -1).flatten(-2)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = leaf(x)
    source = x[..., ::2] if layout == "strided" else x
    w, b = leaf(weight.float()), leaf(bias.float())
    y = facto.batch_norm_stats(source, torch.zeros(4), torch.ones(4), w, b, 0.1, EPS, 2, bits=8)
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    grads = torch.autograd.grad(y, (x, w, b), grad_y.to(dtype))
    assert [g.dtype for g in grads] == [dtype, torch.float32, torch.float32]
    assert all(torch.isfinite(g).all() for g in grads)

    ref_leaves = [leaf(x.detach().double()), leaf(weight), leaf(bias)]
    ref_source = ref_leaves[0][..., ::2] if layout == "strided" else ref_leaves[0]
    y_ref = F.batch_norm(ref_source, torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64), *ref_leaves[1:], True, 0.1,
                         EPS)
    grads_ref = torch.autograd.grad(y_ref, ref_leaves, grad_y)
    exact = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    torch.testing.assert_close(y.double(), y_ref, **exact)
    (gx, gw, gb), (rgx, rgw, rgb) = grads, grads_ref
    torch.testing.assert_close(gb.double(), rgb, **exact)  # reads no map
    # each pooled value decodes within one step, (max − min)/255 of its sample (one group), of its own
    pooled = _pooled_x_hat_reference(ref_source.detach())
    step = (pooled.amax((1, 2, 3)) - pooled.amin((1, 2, 3))) / 255
    bound = (_window_sum(grad_y, 2).abs() * step.view(-1, 1, 1, 1)).sum((0, 2, 3))
    assert ((gw.double() - rgw).abs() <= bound + exact["atol"] + exact["rtol"] * rgw.abs()).all()
    assert (gx.double() - rgx).norm() < 0.05 * rgx.norm()


def test_frozen_codes_give_gamma_its_pooled_gradient():
    """Frozen statistics with 8-bit codes: the output, grad_x and grad_β are exact, grad_γ is
    Σ sumpool_2(grad_y)·meanpool_2(x̂) to within the codes' steps; with γ frozen nothing is coded."""
    x, mean, var, weight, bias = _inputs((2, 3, 6, 8), seed=13)
    leaves = [leaf(t) for t in (x, weight, bias)]
    y = facto.batch_norm(leaves[0], mean, var, leaves[1], leaves[2], EPS, 2, bits=8)
    y_ref = F.batch_norm(x, mean, var, weight, bias, training=False, eps=EPS)
    torch.testing.assert_close(y, y_ref)
    grad_y = torch.randn_like(y_ref)
    gx, gw, gb = _grads(y, leaves, grad_y)
    torch.testing.assert_close(gx, grad_y * (weight / torch.sqrt(var + EPS)).view(1, -1, 1, 1))
    torch.testing.assert_close(gb, grad_y.sum((0, 2, 3)))
    x_hat = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + EPS)
    expected = (_window_sum(grad_y, 2) * _window_sum(x_hat, 2) / 4).sum((0, 2, 3))
    torch.testing.assert_close(gw, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())

    trained = leaf(weight)
    saved = _saved(lambda: facto.batch_norm(leaf(x), mean, var, trained, leaf(bias), EPS, 2, bits=8))
    kept = [t for t in _excluding(saved, trained, mean, var) if t.numel()]
    assert [t.dtype for t in kept] == [torch.uint8, F64, F64]  # codes, mins and scales: no map
    assert kept[0].numel() == 2 * 3 * 3 * 4  # 8 bits per pooled value

    frozen = leaf(x)
    saved = _saved(lambda: facto.batch_norm(frozen, mean, var, weight, leaf(bias), EPS, 2, bits=8))
    assert all(t.numel() == 0 for t in _excluding(saved, weight, mean, var))


def test_bits_are_checked():
    x, _, _, weight, bias = _inputs((2, 3, 4, 4), seed=14)
    with pytest.raises(ValueError, match="bits must be one of"):
        facto.batch_norm_stats(leaf(x), torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64), leaf(weight), bias,
                               bits=3)


@pytest.mark.parametrize("op", ["batch_norm", "batch_norm_stats"])
def test_coded_opcheck(op):
    x, mean, var, weight, bias = _inputs((2, 3, 5, 4), seed=15)
    if op == "batch_norm":
        args = (leaf(x), leaf(weight), leaf(bias), mean, var, EPS, 2, None, True, 4, 8, torch.tensor(3))
    else:
        args = (leaf(x), leaf(weight), leaf(bias), EPS, 2, None, 4, 8, torch.tensor(3))
    torch.library.opcheck(getattr(torch.ops.facto, op).default, args)


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("k", [1, 2])
def test_stats_gradient_keeps_a_channels_last_layout(k, bits):
    """grad_x comes back in x's channels_last layout, pooled or not, coded or not (the decoded x̂ is
    NCHW-ordered)."""
    x = leaf(torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last))
    weight, bias = leaf(torch.ones(4)), leaf(torch.zeros(4))
    y = facto.batch_norm_stats(x, torch.zeros(4), torch.ones(4), weight, bias, 0.1, EPS, k, None, bits)
    y.backward(torch.randn_like(y))
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
