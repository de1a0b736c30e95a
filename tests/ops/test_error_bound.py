"""Each kind of bound gives the eb its definition says, recomputed here from the tensors themselves
(COMET eq. 1 from the measured gradients), and records what the codes kept."""

import math

import pytest
import torch
from torch import nn

from facto_fx.ops import eb_codec
from facto_fx.ops.error_bound import ErrorBound
from facto_fx.ops.error_bounded import compressed_call


def conv_step(bound: ErrorBound, conv: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> None:
    conv.zero_grad(set_to_none=True)
    compressed_call(bound, conv, x).backward(g)


def test_relative_bound_is_a_share_of_the_value_range():
    x = torch.randn(2, 4, 6, 6).relu().requires_grad_()
    bound = ErrorBound(relative=0.05)
    compressed_call(bound, torch.nn.functional.silu, x).sum().backward()  # saves its input
    span = (x.max() - x.min()).item()
    assert bound.eb == pytest.approx(0.05 * span)
    codes = eb_codec.compress(x.detach(), bound.eb)
    assert bound.kept_bytes == codes.nbytes and bound.dense_bytes == x.numel() * 4
    assert bound.ratio == pytest.approx(x.numel() * 4 / codes.nbytes)


def test_relative_bound_of_a_constant_map():
    bound = ErrorBound(relative=0.1)
    x = torch.full((3, 40), 2.5, requires_grad=True)
    compressed_call(bound, torch.sigmoid, x).sum().backward()
    assert bound.eb == pytest.approx(0.1)


def test_adaptive_bound_follows_eq_1():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(3, 4, 8, 8).relu()  # about half the inputs are zero: R matters
    g = torch.randn(3, 6, 8, 8)
    bound = ErrorBound(sigma=0.1, every=2)
    conv_step(bound, conv, x, g)  # call 1: measured, nothing compressed
    assert bound.eb is None and bound.kept_bytes == 0
    sigma = 0.1 * conv.weight.grad.std().item()
    n, r, mean_g = 3 * 8 * 8, (x != 0).float().mean().item(), g.abs().mean().item()
    expected = min(sigma * math.sqrt(3) / (mean_g * math.sqrt(n * r)), 0.5 * x.std().item())
    assert bound.adaptive_eb == pytest.approx(expected, rel=1e-5)

    conv_step(bound, conv, x, g)  # call 2: compressed with it
    assert bound.eb == pytest.approx(expected, rel=1e-5) and bound.kept_bytes > 0
    compressed_error = conv.weight.grad.clone()
    conv_step(bound, conv, x, 2 * g)  # call 3 (every=2): measured again, exact
    # Doubling grad_Y doubles both σ and L̄: eq. 1's bound is unchanged.
    assert bound.adaptive_eb == pytest.approx(expected, rel=1e-4)
    exact = torch.nn.grad.conv2d_weight(x, conv.weight.shape, g, padding=1)
    # the realised gradient error is of the order of σ (the design target), not far beyond it
    assert (compressed_error - exact).std().item() < 3 * sigma


def test_adaptive_bound_is_capped_by_the_maps_spread():
    """A map of 3 ± 0.01: grad_W is large (3·Σg), so eq. 1 allows an eb of the order of 0.5, which
    would quantise the ±0.01 spread, all the map's information, away."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    x = 3.0 + 0.01 * torch.randn(2, 3, 8, 8)
    bound = ErrorBound(sigma=0.1)
    conv_step(bound, conv, x, torch.randn(2, 4, 6, 6))
    assert bound.adaptive_eb == pytest.approx(0.5 * x.std().item())


def test_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one"):
        ErrorBound()


def test_measurements_without_backward_leave_one_hook():
    conv = nn.Conv2d(2, 3, 3)
    bound = ErrorBound(sigma=0.1)
    for _ in range(5):  # forward calls with grad enabled, no backward (an evaluation without no_grad)
        compressed_call(bound, conv, torch.randn(1, 2, 6, 6))
    assert len(conv.weight._backward_hooks) == 1
