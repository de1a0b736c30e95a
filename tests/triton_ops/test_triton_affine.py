"""Triton affine (facto::scale and frozen batch-norm): y and the mean-pooled map equal the PyTorch
reference, and the fused backward's grad_x and per-channel sums equal sumpool_k(grad_y)·pooled."""

import pytest
import torch
from kernel_cases import DTYPES, KernelSpy, channels_last, in_layout, noncontiguous, randn, run_op, tolerance

import facto_fx
from facto_fx.ops.batch_norm import batch_norm_fwd
from facto_fx.ops.lossy import mean_pool, sum_pool
from facto_fx.ops.scale import scale_fwd, spatial_kernel
from facto_fx.triton_ops import affine
from facto_fx.triton_ops.affine import affine_backward, affine_forward

# shape, lossy_kernel: even and odd maps (ceil-mode edge windows), k = 1 and 3, non-NCHW inputs
CASES = [((2, 3, 4, 4), 2), ((1, 2, 5, 7), 2), ((2, 2, 5, 4), 3), ((2, 3, 3, 3), 1), ((3, 4), 2), ((2, 3, 5), 2)]


# channels_last maps: odd sizes, batch 1, more channels than one tile holds (40 > MAX_BLOCK_C)
CHANNELS_LAST_CASES = [((2, 3, 4, 4), 2), ((1, 5, 5, 7), 2), ((2, 40, 5, 4), 3), ((2, 3, 3, 3), 1)]


def _stats(channels):
    g = torch.Generator().manual_seed(7)
    mean, var = torch.randn(channels, generator=g), torch.rand(channels, generator=g) + 0.5
    return mean, var, torch.randn(channels, generator=g), torch.randn(channels, generator=g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "k"), CASES, ids=str)
def test_scale_forward_matches_reference(shape, k, dtype):
    x, s = randn(shape, dtype), torch.tensor([1.7])
    y, pooled = affine_forward(x, 1, k, None, True, weight=s)
    y_ref, pooled_ref = scale_fwd(x, s, k, None, True)
    torch.testing.assert_close(y, y_ref.to(dtype), **tolerance(dtype))
    torch.testing.assert_close(pooled, pooled_ref, **tolerance(dtype))
    assert affine_forward(x, 1, k, None, False, weight=s)[1].numel() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "k"), CASES, ids=str)
def test_batch_norm_forward_matches_reference(shape, k, dtype):
    x = randn(shape, dtype)
    mean, var, weight, bias = _stats(shape[1])
    y, pooled = affine_forward(x, shape[1], k, torch.bfloat16, True, mean, torch.rsqrt(var + 1e-5), weight, bias)
    y_ref, pooled_ref, *_ = batch_norm_fwd(x, weight, bias, mean, var, 1e-5, k, torch.bfloat16, True, None, 256, None)
    torch.testing.assert_close(y, y_ref.to(dtype), **tolerance(dtype))
    assert pooled.dtype == torch.bfloat16
    torch.testing.assert_close(pooled, pooled_ref, **tolerance(torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "k"), CASES, ids=str)
def test_backward_matches_reference(shape, k, dtype):
    channels = shape[1]
    grad_y, pooled = randn(shape, dtype, seed=1), randn(shape, dtype, seed=2)
    kk = spatial_kernel(grad_y, k)
    pooled = sum_pool(pooled.float(), kk).to(dtype)
    gain = torch.randn(channels)
    grad_x, grad_gamma, grad_beta = affine_backward(grad_y, pooled, gain, channels, k, (True, True, True))
    view = gain.view(1, -1, *([1] * (len(shape) - 2)))
    reduce_dims = [d for d in range(len(shape)) if d != 1]
    torch.testing.assert_close(grad_x, (grad_y.float() * view).to(dtype), **tolerance(dtype))
    expected_gamma = (sum_pool(grad_y.float(), kk) * pooled.float()).sum(reduce_dims)
    torch.testing.assert_close(grad_gamma, expected_gamma, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_beta, grad_y.float().sum(reduce_dims), rtol=1e-4, atol=1e-4)


def test_backward_computes_only_what_is_needed():
    grad_y = randn((2, 3, 4, 4), torch.float32)
    grad_x, grad_s, grad_b = affine_backward(grad_y, torch.empty(0), 2.0, 1, 2, (True, False, False))
    assert grad_s is None and grad_b is None
    assert torch.equal(grad_x, grad_y * 2.0)


def test_noncontiguous_input():
    x, s = noncontiguous((2, 3, 5, 4), torch.float32), torch.tensor([0.5])
    y, pooled = affine_forward(x, 1, 2, None, True, weight=s)
    y_ref, pooled_ref = scale_fwd(x, s, 2, None, True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(pooled, pooled_ref)


def test_scale_of_any_one_element_shape():
    """A fixup-style scale stored as (1, 1, 1, 1) runs on the Triton path like on PyTorch's."""
    import facto_fx
    from facto_fx import ops

    x = randn((2, 3, 4, 4), torch.float32)
    results = {}
    for kernels in ("torch", "triton"):
        s = torch.full((1, 1, 1, 1), 1.7, requires_grad=True)
        leaf = x.clone().requires_grad_(True)
        with facto_fx.use_kernels(kernels):
            y = ops.scale(leaf, s)
            y.square().sum().backward()
        results[kernels] = (y.detach(), leaf.grad, s.grad)
    for reference, value in zip(results["torch"], results["triton"], strict=True):
        torch.testing.assert_close(value, reference)
    assert results["triton"][2].shape == (1, 1, 1, 1)


def _op_case(op: str, shape, k):
    """(op, its arguments after x): scale by a trained scalar, or batch-norm with trained γ and β."""
    if op == "scale":
        return torch.ops.facto.scale, (torch.tensor([1.7], requires_grad=True), k, None, True)
    mean, var, weight, bias = _stats(shape[1])
    args = (weight.requires_grad_(), bias.requires_grad_(), mean, var, 1e-5, k, torch.bfloat16, True, None, 256, None)
    return torch.ops.facto.batch_norm, args


@pytest.mark.parametrize("grad_layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "k"), CHANNELS_LAST_CASES, ids=str)
@pytest.mark.parametrize("op", ["scale", "batch_norm"])
def test_channels_last_input_matches_the_pytorch_path(op, shape, k, dtype, grad_layout, monkeypatch):
    """A channels_last map is read in place and gives the PyTorch path's y, pooled x̂ (values and
    layout) and grad_x, whatever the layout of grad_y.

    The parameters' gradients are sums of sumpool_k(grad_y)·pooled over each path's own pooled
    map, which the two paths round to 16 bits apart (and some sums cancel), so they are checked
    against that formula in fp64.
    """
    fn, args = _op_case(op, shape, k)
    x = channels_last(randn(shape, dtype))
    grad_y = in_layout(randn(shape, dtype, seed=1), grad_layout)
    forward = KernelSpy.install(monkeypatch, affine, "_affine_fwd_kernel")
    backward = KernelSpy.install(monkeypatch, affine, "_affine_bwd_kernel")
    y, pooled, (grad_x, *param_grads) = run_op(fn, x, *args, kernels="triton", grad_y=grad_y)
    assert forward.read_in_place(x) and backward.read_in_place(grad_y)
    y_ref, pooled_ref, (grad_x_ref, *_) = run_op(fn, x, *args, kernels="torch", grad_y=grad_y)
    torch.testing.assert_close(y, y_ref, **tolerance(dtype))
    assert y.stride() == y_ref.stride() == x.stride()
    torch.testing.assert_close(pooled, pooled_ref, **tolerance(pooled.dtype))
    assert pooled.dtype == pooled_ref.dtype and pooled.stride() == pooled_ref.stride()
    assert pooled.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(grad_x, grad_x_ref, **tolerance(dtype))
    window_sums = sum_pool(grad_y.double(), k) * pooled.double()
    if op == "scale":
        expected = [window_sums.sum().reshape(1)]
    else:
        expected = [window_sums.sum((0, 2, 3)), grad_y.double().sum((0, 2, 3))]
    for grad, reference in zip(param_grads, expected, strict=True):
        torch.testing.assert_close(grad.double(), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("param_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_parameters_of_any_float_dtype_and_layout_are_read_as_they_are(param_dtype):
    """The kernel reads the statistics and γ, β in their own dtype, strided too (a model in
    half precision, a view), and equals the reference on the same values in fp32."""
    x = randn((2, 3, 4, 4), torch.float32)
    mean, var, weight, bias = (t.to(param_dtype) for t in _stats(3))
    weight = torch.stack([weight, weight], 1)[:, 0]  # every other element of its storage
    assert not weight.is_contiguous()
    rstd = torch.rsqrt(var + 1e-5)
    y, pooled = affine_forward(x, 3, 2, None, True, mean, rstd, weight, bias)
    mean, rstd, weight, bias = (t.float().view(1, 3, 1, 1) for t in (mean, rstd, weight, bias))
    x_hat = (x - mean) * rstd
    torch.testing.assert_close(y, x_hat * weight + bias)
    torch.testing.assert_close(pooled, mean_pool(x_hat, 2))


def test_a_term_with_the_wrong_number_of_values_is_refused():
    x = randn((2, 3, 4, 4), torch.float32)
    with pytest.raises(ValueError, match="2 values where 3 were expected"):
        affine_forward(x, 3, 2, None, True, weight=torch.ones(2))
    with pytest.raises(ValueError, match="need 1 or 3 values"):
        affine_backward(x, x, torch.ones(2), 2, 2, (True, False, False))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_norm_codes_follow_the_kernel(layout):
    """Frozen batch-norm keeping its pooled x̂ in 8-bit codes: the Triton path (affine kernel, then
    the quantize kernel) gives the PyTorch path's y, grad_x and grad_β, and a grad_γ within the
    codes' rounding of the uncoded one (the two paths draw different noise)."""
    shape = (2, 8, 12, 10)
    x = randn(shape, torch.float32)
    x = channels_last(x) if layout == "channels_last" else x
    mean, var, weight, bias = _stats(shape[1])
    grad_y = randn(shape, torch.float32, seed=1)
    results = {}
    for kernels, bits in (("triton", 8), ("torch", 8), ("torch", None)):
        leaves = [x.detach().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()]
        torch.manual_seed(0)
        with facto_fx.use_kernels(kernels):
            y = facto_fx.ops.batch_norm(leaves[0], mean, var, leaves[1], leaves[2], 1e-5, 2, bits=bits)
            y.backward(grad_y)
        results[kernels, bits] = (y.detach(), *(t.grad for t in leaves))
    (y, gx, gw, gb), (y_ref, gx_ref, gw_ref, gb_ref) = results["triton", 8], results["torch", 8]
    for got, expected in ((y, y_ref), (gx, gx_ref), (gb, gb_ref)):
        torch.testing.assert_close(got, expected, **tolerance(torch.float32))
    uncoded = results["torch", None][2]
    for coded in (gw, gw_ref):  # each path's codes are used (γ's gradient moves) and round little
        assert 0 < (coded - uncoded).norm() < 0.01 * uncoded.norm()
