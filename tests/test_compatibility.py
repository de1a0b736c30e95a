"""Real models from timm and torchvision: exact at M = 0, trainable after compile and with every
method's gradients right, or refused.

A sample of the families whose sub-classed layers once made `compile` silently change the model
(batch-norm + activation modules, "same" padding computed in forward, mixed and standardised
convs, drop-path, stochastic depth). `python benchmarks/compatibility.py` runs every model.
"""

from __future__ import annotations

import re

import pytest
import torch
from test_benchmarks import _load

import facto_fx
from facto_fx.passes.verify import relative_error

compatibility = _load("compatibility")
gradient_check = _load("gradient_check")

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
    row = compatibility.check(spec, size=32, gradient_methods=())  # gradients: below, on fewer models
    assert row.status == "exact", row
    assert row.error <= compatibility.EXACT and row.trains == "yes"
    assert row.facto_mib < row.vanilla_mib


def test_the_table_gives_the_median_of_the_models_saved_bytes():
    """Refused models (no bytes) are left out of the median: 10 %, 20 %, 40 % give 20 %."""
    rows = [compatibility.Row(f"m{i}", "exact", vanilla_mib=50.0, facto_mib=facto) for i, facto in
            enumerate([20.0, 5.0, 10.0])] + [compatibility.Row("refused", "refused")]
    summary = compatibility.to_markdown(rows, 32).strip().splitlines()[-1]
    assert summary == "4 models: 3 exact, 1 refused, 0 failed. Median saved bytes: 20.0 % of vanilla's."


@pytest.mark.parametrize("spec", ["torchvision:resnet18", "torchvision:mobilenet_v3_small"])
def test_every_methods_gradients_match_their_reference(spec):
    """Facto against dense autograd of the merged weight, strips against unsplit Facto, HOSVD at
    eps = 1 against dense, ErrorBounded within its bound: the benchmark's gradient column."""
    row = compatibility.check(spec, size=32)
    assert row.status == "exact", row
    assert all(f"{method} -" not in row.gradient for method in ("facto", "strips", "hosvd", "eb")), row.gradient
    if spec.endswith("mobilenet_v3_small"):  # depthwise convs and squeeze-excite products: the store ran
        assert "fixed -" not in row.gradient, row.gradient


def _corrupting(monkeypatch, corrupt):
    """gradient_check's compile, with `corrupt` applied to the gradient of the first Facto layer's M."""
    compile_ = gradient_check.facto_fx.compile

    def compile_and_corrupt(*args, **kwargs):
        fmodel = compile_(*args, **kwargs)
        layer = next(m for m in fmodel.modules() if isinstance(m, gradient_check.FactoConv2d))
        layer.M.register_hook(corrupt)
        return fmodel

    monkeypatch.setattr(gradient_check.facto_fx, "compile", compile_and_corrupt)


@pytest.mark.parametrize(("corrupt", "problem"), [
    (lambda g: g * 1.001, "facto: .* off by 1.0e-03"),
    (lambda g: g * float("nan"), "facto: non-finite gradient"),
])
def test_a_wrong_gradient_fails_the_check(monkeypatch, corrupt, problem):
    import torchvision

    _corrupting(monkeypatch, corrupt)
    torch.manual_seed(0)
    (result,) = gradient_check.check_gradients(lambda: torchvision.models.resnet18(num_classes=10),
                                               torch.randn(2, 3, 32, 32), ["facto"])
    assert not result.ok and re.search(problem, result.problem), result


def test_coarse_activation_codes_fail_the_few_bit_check(monkeypatch):
    """The few-bit check tells codes apart: mobilenet_v3_small's Hardswish at 8 bits is within
    2e-2 of dense autograd (measured 8e-4), at 2 bits not (measured 4.7e-2)."""
    import torchvision

    build = lambda: torchvision.models.mobilenet_v3_small(num_classes=10)  # noqa: E731
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    (fine,) = gradient_check.check_gradients(build, x, ["fewbit"])
    assert fine.ok and 0 < fine.error < gradient_check.FEWBIT_TOLERANCE / 10, fine
    monkeypatch.setattr(gradient_check, "FEWBIT_BITS", 2)
    (coarse,) = gradient_check.check_gradients(build, x, ["fewbit"])
    assert not coarse.ok and "fewbit: the model's gradient off by" in coarse.problem, coarse


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


def test_coarse_store_codes_fail_the_fixed_rate_check(monkeypatch):
    """The store's check tells bits apart on convnext_atto (depthwise convs, layer norms): 8 bits
    within its 2e-2 tolerance, 2 bits not."""
    pytest.importorskip("timm")
    import timm

    build = lambda: timm.create_model("convnext_atto", num_classes=10)  # noqa: E731
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    (fine,) = gradient_check.check_gradients(build, x, ["fixed"])
    assert fine.ok and 0 < fine.error < gradient_check.FIXED_TOLERANCE, fine
    monkeypatch.setattr(gradient_check, "FIXED_BITS", 2)
    (coarse,) = gradient_check.check_gradients(build, x, ["fixed"])
    assert not coarse.ok and "fixed: the model's gradient off by" in coarse.problem, coarse
