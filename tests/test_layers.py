"""Facto layers: the low-rank re-parameterisation's named methods behave as documented."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from facto_fx.layers import FactoBatchNorm, FactoConv2d, FactoLinear, direction_seed, draw_direction


@pytest.mark.parametrize("scale, power", [("unbiased", 0.5), ("paper", 0.25)])
def test_direction_rows_have_norm_alpha(scale, power):
    """Unit-norm Gaussian rows scaled by α = (I/R)^(1/2), or (I/R)^(1/4) as in paper eq. 13."""
    d = draw_direction(7, 90, seed=3, dtype=torch.float32, device=torch.device("cpu"), scale=scale)
    assert d.shape == (7, 90)
    torch.testing.assert_close(d.norm(dim=1), torch.full((7,), (90 / 7) ** power))


def test_direction_is_reproducible_and_seed_dependent():
    draw = lambda seed: draw_direction(4, 12, seed, torch.float64, torch.device("cpu"))  # noqa: E731
    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))
    assert direction_seed(1, 0) != direction_seed(1, 1) != direction_seed(2, 1)


def test_meta_direction_allocates_nothing():
    d = draw_direction(3, 10**9, seed=0, dtype=torch.float32, device=torch.device("meta"))
    assert d.is_meta and d.shape == (3, 10**9)


@pytest.fixture
def conv_layer():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    layer = FactoConv2d.from_conv(conv, rank=2, lossy_kernel=2, storage_dtype=None, seed=9)
    with torch.no_grad():
        layer.M.normal_()
    return layer


def test_conv_layer_freezes_weight_and_trains_m_and_bias(conv_layer):
    assert not conv_layer.weight.requires_grad
    assert conv_layer.M.requires_grad and conv_layer.bias.requires_grad
    assert conv_layer.M.shape == (6, 2) and conv_layer.D.shape == (2, 4 * 9)


def test_conv_to_dense_computes_the_same_output(conv_layer):
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(conv_layer.to_dense()(x), conv_layer(x))


def test_merge_keeps_output_and_zeroes_m(conv_layer):
    x = torch.randn(2, 4, 9, 9)
    before = conv_layer(x)
    conv_layer.merge()
    assert torch.count_nonzero(conv_layer.M) == 0
    torch.testing.assert_close(conv_layer(x), before)


def test_redraw_changes_d_and_counts(conv_layer):
    old = conv_layer.D.clone()
    conv_layer.redraw()
    assert int(conv_layer.draws) == 1 and not torch.equal(old, conv_layer.D)
    # the default, unbiased scale
    torch.testing.assert_close(conv_layer.D.norm(dim=1), torch.full((2,), (36 / 2) ** 0.5))


def test_regularize_is_weight_decay_on_omega(conv_layer):
    expected = conv_layer.weight - 0.1 * conv_layer.merged_weight()
    conv_layer.regularize(0.1)
    torch.testing.assert_close(conv_layer.weight, expected)


def test_linear_to_dense_and_delta():
    torch.manual_seed(0)
    layer = FactoLinear.from_linear(nn.Linear(10, 3), rank=4, storage_dtype=None, seed=1)
    with torch.no_grad():
        layer.M.normal_()
    torch.testing.assert_close(layer.get_delta_weight(), layer.M @ layer.D)
    x = torch.randn(5, 10)
    torch.testing.assert_close(layer.to_dense()(x), layer(x))


def _assert_folded_matches_d(layer: FactoConv2d) -> None:
    """conv(x, folded, stride 2k) equals meanpool_k(conv(x, D's filter, stride 2)): the pool, folded."""
    x = torch.randn(2, layer.in_channels, 13, 13)
    d_filter = layer.D.view(layer.rank, *layer.weight.shape[1:])
    expected = nn.functional.avg_pool2d(nn.functional.conv2d(x, d_filter, stride=2), 2)
    torch.testing.assert_close(nn.functional.conv2d(x, layer.folded, stride=4), expected)


def test_folded_filter_follows_every_draw_of_d(conv_layer):
    """The per-draw projection filter is refreshed by redraw and by loading a state dict."""
    _assert_folded_matches_d(conv_layer)
    before = conv_layer.folded.clone()
    conv_layer.merge()
    conv_layer.redraw()
    assert not torch.equal(conv_layer.folded, before)
    _assert_folded_matches_d(conv_layer)
    other = FactoConv2d.from_conv(nn.Conv2d(4, 6, 3, stride=2, padding=1), 2, 2, None, seed=10)
    other.load_state_dict(conv_layer.state_dict())
    assert "folded" not in conv_layer.state_dict()
    _assert_folded_matches_d(other)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_with_batch_statistics_tracks_like_torch(momentum):
    """Training steps update the shared running statistics and the batch count as nn.BatchNorm2d
    does (momentum=None: the cumulative average); eval uses them; lossy_kernel=1 is exact."""
    torch.manual_seed(0)
    bn, reference = nn.BatchNorm2d(5, momentum=momentum), nn.BatchNorm2d(5, momentum=momentum)
    layer = FactoBatchNorm(bn, lossy_kernel=1, storage_dtype=None, batch_statistics=True)
    assert "batch statistics" in repr(layer)
    for _ in range(3):
        x = torch.randn(3, 5, 4, 6) * 2 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_ref = layer(xa), reference(xb)
        torch.testing.assert_close(y, y_ref)
        y.square().sum().backward()
        y_ref.square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(bn.running_mean, reference.running_mean)
    torch.testing.assert_close(bn.running_var, reference.running_var)
    assert bn.num_batches_tracked.item() == reference.num_batches_tracked.item() == 3
    torch.testing.assert_close(bn.weight.grad, reference.weight.grad)
    layer.eval(), reference.eval()
    torch.testing.assert_close(layer(x), reference(x))
