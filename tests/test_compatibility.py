"""Real models from timm and torchvision: exact at M = 0 and trainable after compile, or refused.

A sample of the families whose sub-classed layers once made `compile` silently change the model
(batch-norm + activation modules, "same" padding computed in forward, mixed and standardised
convs, drop-path, stochastic depth). `python benchmarks/compatibility.py` runs every model.
"""

from __future__ import annotations

import pytest
import torch
from test_benchmarks import _load

import facto_fx
from facto_fx.passes.verify import relative_error

compatibility = _load("compatibility")

SAMPLE = [
    "timm:efficientnet_b0",  # BatchNormAct2d, squeeze-excite
    "timm:tf_efficientnet_b0",  # Conv2dSame (untraceable padding)
    "timm:mixnet_s",  # MixedConv2d
    "timm:lcnet_050",
    "timm:repvgg_a0",
    "timm:nf_resnet26",  # ScaledStdConv2d (weight computed in forward)
    "torchvision:efficientnet_b0",  # StochasticDepth (training flag)
    "torchvision:mobilenet_v3_small",
]


@pytest.mark.parametrize("spec", SAMPLE)
def test_real_model_is_exact_at_m0_and_trains(spec):
    if spec.startswith("timm:"):
        pytest.importorskip("timm")
    row = compatibility.check(spec, size=32)
    assert row.status == "exact", row
    assert row.error <= compatibility.EXACT and row.trains == "yes"
    assert row.facto_mib < row.vanilla_mib


def test_drop_path_follows_the_mode_in_training():
    """With batch statistics kept, a train-mode step of the Facto model equals the original's,
    random drop-path included: the drop-path modules run whole, reading their mode at run time."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10, drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    fmodel = facto_fx.compile(model, apply_ratio=1.0, batch_norm="train", example_inputs=(x,))
    opaque = fmodel.meta["opaque_modules"]
    assert opaque and all(name.endswith("drop_path") for name in opaque)
    for seed in range(3):
        torch.manual_seed(seed)
        expected = model(x)
        torch.manual_seed(seed)
        assert relative_error(fmodel(x).detach(), expected.detach()) <= 1e-5
