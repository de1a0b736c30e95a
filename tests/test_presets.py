"""The Facto + ErrorBounded preset: Facto's layers as Facto alone makes them, everything Facto
leaves (and the full-size frozen batch-norms) held by ErrorBounded, the forward unchanged."""

import copy

import pytest
import torch
import torchvision

import facto_fx
from facto_fx import presets


@pytest.mark.parametrize("batch_norm", ["freeze", "lossy"])
def test_preset_covers_what_facto_leaves_and_computes_the_same(batch_norm):
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    alone = facto_fx.compile(copy.deepcopy(model), batch_norm=batch_norm)
    both = facto_fx.compile(copy.deepcopy(model), presets.facto_error_bounded(exclude=["features.0.0"],
                                                                               batch_norm=batch_norm))
    by_layer = {d.layer: d for d in facto_fx.decisions(both)}
    for d in facto_fx.decisions(alone):
        mine = by_layer[d.layer]
        if d.rewritten and d.method.saves_memory:
            assert mine.method == d.method and mine.wrapper is None, d.layer  # Facto's own
        elif d.layer == "features.0.0":
            assert not mine.rewritten and mine.excluded  # excluded by name: left exactly as it is
        elif d.rewritten:  # batch-norm at full size: what it saves is held compressed
            assert type(mine.wrapper).__name__ == "ErrorBounded" and mine.compress, d.layer
        elif d.kind in ("activation", "mul", "conv2d", "linear"):
            assert type(mine.method).__name__ == "ErrorBounded" and "fallback" in mine.reason, d.layer
    x = torch.randn(2, 3, 64, 64)
    both.eval(), alone.eval()  # the classifier's dropout
    with torch.enable_grad():
        torch.testing.assert_close(both(x), alone(x), rtol=0, atol=0)
    both.train()
    torch.manual_seed(1)
    both(x).square().mean().backward()
    report = facto_fx.report(both, x)
    assert batch_norm == "lossy" or "frozen+eb" in {r.decision for r in report.rows}
    assert report.ratio < facto_fx.report(alone.train(), x).ratio


def test_fallback_respects_exclusions_of_batch_statistics_layers():
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    config = facto_fx.FactoConfig(batch_norm="train", exclude=["1"], layer_filter=lambda name, _m: name != "3",
                                  fallback=facto_fx.ErrorBounded(1e-2))
    by_layer = {d.layer: d for d in facto_fx.decisions(facto_fx.compile(model, config))}
    assert not by_layer["1"].rewritten and not by_layer["3"].rewritten
    assert by_layer["0"].rewritten and by_layer["2"].rewritten  # the convs: Facto or the fallback
