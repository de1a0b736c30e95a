"""facto dropout: inverted dropout whose backward reuses the forward mask from a 1-bit packed copy."""

import math

import pytest
import torch
from saved_tensors import saved_tensors as _saved

import facto_fx.ops as facto
from facto_fx.ops.bitpack import pack_bits


def _nonzero_input(shape, seed=0):
    """Inputs bounded away from 0, so that y / x recovers the mask unambiguously."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
    sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
    return (x * sign).requires_grad_(True)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_output_is_zero_or_rescaled_and_grad_uses_same_mask(p):
    torch.manual_seed(0)
    x = _nonzero_input((3, 5, 7))
    y = facto.dropout(x, p)
    kept = y != 0
    torch.testing.assert_close(y[kept], x.detach()[kept] / (1 - p))
    grad_y = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, [x], grad_y)
    torch.testing.assert_close(gx, (y / x).detach() * grad_y)
    assert torch.equal(gx == 0, ~kept)


@pytest.mark.parametrize("grad_layout", [torch.channels_last, torch.contiguous_format])
def test_channels_last_input(grad_layout):
    """y stays channels_last and equals x·keep/(1 - p) for the seeded draws, whose mask is packed in
    memory order; the gradient applies the same mask whatever the layout of grad_y."""
    x = _nonzero_input((2, 3, 4, 5)).detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    torch.manual_seed(4)
    keep = torch.rand_like(x, dtype=torch.float32) >= 0.3
    torch.manual_seed(4)
    saved = _saved(lambda: facto.dropout(x, 0.3))
    assert torch.equal(saved[0], pack_bits(keep.as_strided((x.numel(),), (1,)), 1))
    torch.manual_seed(4)
    y = facto.dropout(x, 0.3)
    expected = x.detach() * keep / 0.7
    assert torch.equal(y, expected) and y.stride() == expected.stride() == x.stride()
    grad_y = torch.randn(x.shape, dtype=x.dtype).contiguous(memory_format=grad_layout)
    (grad_x,) = torch.autograd.grad(y, [x], grad_y)
    assert torch.equal(grad_x, grad_y * keep / 0.7)


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_drop_fraction_close_to_p(p):
    torch.manual_seed(1)
    x = torch.ones(400_000, requires_grad=True)
    dropped = (facto.dropout(x, p) == 0).double().mean().item()
    assert abs(dropped - p) < 0.01


def test_masks_differ_between_calls():
    """Each call draws a fresh mask."""
    torch.manual_seed(2)
    x = torch.ones(1000, requires_grad=True)
    assert not torch.equal(facto.dropout(x, 0.5), facto.dropout(x, 0.5))


@pytest.mark.parametrize("n", [1, 13, 64, 1001])
def test_saves_one_bit_per_element(n):
    x = _nonzero_input((n,))
    saved = _saved(lambda: facto.dropout(x, 0.3))
    assert [(t.dtype, t.numel()) for t in saved] == [(torch.uint8, math.ceil(n / 8))]


def test_identity_outside_training_or_p_zero():
    x = _nonzero_input((4, 6))
    assert torch.equal(facto.dropout(x, 0.5, training=False), x)
    assert torch.equal(facto.dropout(x, 0.0), x)


def test_no_grad_training_still_drops():
    """Without autograd it falls back to F.dropout, which must still drop and rescale."""
    torch.manual_seed(3)
    x = _nonzero_input((2000,)).detach()
    y = facto.dropout(x, 0.5)
    kept = y != 0
    assert 0 < kept.sum() < x.numel()
    torch.testing.assert_close(y[kept], x[kept] * 2)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_invalid_p_raises(p):
    with pytest.raises(ValueError):
        facto.dropout(torch.ones(3, requires_grad=True), p)


def test_opcheck():
    """p = 0 keeps every element, so the op is deterministic enough for opcheck's comparisons."""
    x = torch.randn(3, 17, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.facto.dropout.default, (x, 0.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_keep_rate_is_unbiased_in_every_dtype(dtype):
    """Uniforms drawn in 16 bits sit on a coarse grid: bf16 kept 0.898 instead of 0.9 at p = 0.1."""
    torch.manual_seed(0)
    x = torch.ones(1_000_000, dtype=dtype, requires_grad=True)
    kept = (facto.dropout(x, 0.1) != 0).double().mean().item()
    assert abs(kept - 0.9) < 1e-3  # 3.3 standard deviations of the binomial rate
