"""The scheduler: which layers apply_ratio compresses (paper §4.2), overrides, and its reasons."""

from __future__ import annotations

import math

import pytest
import torchvision
from torch import nn

import facto_fx
from facto_fx.models import fixup_resnet18
from facto_fx.passes.schedule import Decision

# A small inr keeps the direction matrices of vgg11's 25088-wide classifier cheap; the schedule
# does not depend on it.
INR = 0.01
CONVS = ["features.0", "features.3", "features.6", "features.8", "features.11", "features.13",
         "features.16", "features.18"]
LINEARS = ["classifier.0", "classifier.3", "classifier.6"]


@pytest.fixture(scope="module")
def vgg11():
    return torchvision.models.vgg11(weights=None, num_classes=4)


def _decide(model: nn.Module, **options) -> dict[str, Decision]:
    return {d.layer: d for d in facto_fx.decisions(facto_fx.compile(model, inr=INR, **options))}


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.6, 1.0])
def test_apply_ratio_compresses_the_shallowest_convs(vgg11, ratio):
    decisions = _decide(vgg11, apply_ratio=ratio)
    assert not decisions["features.0"].compress
    assert decisions["features.0"].reason.startswith("input layer")
    n = len(CONVS) - 1
    compressed = [c for c in CONVS if decisions[c].compress]
    assert len(compressed) == math.ceil(ratio * n)
    depths = sorted(CONVS[1:], key=lambda c: decisions[c].depth)
    assert compressed == depths[: len(compressed)]
    for conv in CONVS[1:]:
        assert f"of {n} from the input" in decisions[conv].reason


@pytest.mark.parametrize(("ratio", "linears_compressed"), [(0.6, False), (0.85, False), (1.0, True)])
def test_linear_layers_follow_the_convs(vgg11, ratio, linears_compressed):
    """ratio 0.85 (6 of 7) still leaves the deepest conv dense, so the classifier stays dense too."""
    decisions = _decide(vgg11, apply_ratio=ratio)
    assert all(decisions[n].compress == linears_compressed for n in LINEARS)


def test_every_decision_has_a_reason(vgg11):
    decisions = _decide(vgg11)
    assert len(decisions) == 28
    assert all(d.reason for d in decisions.values())


def test_include_exclude_and_filter_override_the_ratio(vgg11):
    seen = {}

    def keep(name, module):
        seen[name] = module
        return name != "features.6"

    decisions = _decide(
        vgg11, apply_ratio=0.3, include=["features.18", "classifier.6"], exclude=["features.3"], layer_filter=keep
    )
    assert (decisions["features.18"].compress, decisions["features.18"].reason) == (True, "included by name")
    assert (decisions["classifier.6"].compress, decisions["classifier.6"].reason) == (True, "included by name")
    assert (decisions["features.3"].compress, decisions["features.3"].reason) == (False, "excluded by name")
    assert (decisions["features.6"].compress, decisions["features.6"].reason) == (False, "excluded by layer_filter")
    assert decisions["features.8"].compress
    assert isinstance(seen["features.8"], nn.Conv2d)


def test_unknown_include_name_suggests_the_closest(vgg11):
    with pytest.raises(ValueError, match=r"feature\.3.*did you mean.*'features\.3'"):
        facto_fx.compile(vgg11, include=["feature.3"])


def test_unknown_exclude_name_rejected(vgg11):
    with pytest.raises(ValueError, match="exclude names 'nope'"):
        facto_fx.compile(vgg11, exclude=["nope"])


def test_including_the_input_layer_rejected(vgg11):
    with pytest.raises(ValueError, match="input layer"):
        facto_fx.compile(vgg11, include=["features.0"])


def test_excluded_conv_keeps_later_linears_dense(vgg11):
    decisions = _decide(vgg11, apply_ratio=1.0, exclude=["features.18"])
    assert not decisions["features.18"].compress
    assert not any(decisions[n].compress for n in LINEARS)


def test_fixup_scale_layers_scheduled_and_counted():
    decisions = {d.layer: d for d in facto_fx.decisions(facto_fx.compile(fixup_resnet18(num_classes=4)))}
    scales = [d for d in decisions.values() if d.kind == "scale"]
    assert len(scales) == 8 and decisions["layer1.0.scale"].rewritten
    ordered = [d for d in decisions.values() if d.kind in ("conv2d", "scale") and d.layer != "conv1"]
    assert len(ordered) == 19 + 8
    compressed = [d for d in ordered if d.compress]
    assert len(compressed) == math.ceil(0.6 * len(ordered))
    assert max(d.depth for d in compressed) <= min(d.depth for d in ordered if not d.compress)
    assert all("of 27 from the input" in d.reason for d in ordered)
    assert decisions["layer1.0.scale"].compress and not decisions["layer4.1.scale"].compress


def test_last_n_counts_conv_layers_from_the_output(vgg11):
    """Last(2) takes the two deepest convs in execution order; the rest follow apply_ratio (0 here)."""
    decisions = _decide(vgg11, apply_ratio=0.0, methods={facto_fx.Last(2): facto_fx.FactoLowRank(inr=0.5)})
    chosen = [c for c in CONVS if decisions[c].method is not None]
    assert chosen == CONVS[-2:]
    assert decisions["features.18"].reason == "FactoLowRank by Last(2)"
    assert decisions["features.18"].method.inr == 0.5
    assert all(decisions[n].method is None for n in LINEARS)  # earlier convs are dense


def test_mixing_front_by_ratio_and_back_by_last(vgg11):
    """apply_ratio's Facto on the front convs, another config on the last ones: Last wins there."""
    back = facto_fx.FactoLowRank(inr=0.1, lossy_kernel=1)
    decisions = _decide(vgg11, apply_ratio=0.5, methods={facto_fx.Last(3): back})
    assert [decisions[c].method == back for c in CONVS] == [False] * 5 + [True] * 3
    assert [decisions[c].compress for c in CONVS] == [False] + [True] * 4 + [True] * 3


def test_method_resolution_order(vgg11):
    """Exact name beats pattern (first in mapping order), which beats apply_ratio."""
    low, high = facto_fx.FactoLowRank(inr=0.1), facto_fx.FactoLowRank(inr=0.9)
    decisions = _decide(vgg11, apply_ratio=1.0, methods={
        "features.1[68]": high, "features.1*": low, "features.16": None, "classifier.*": None,
    })
    assert decisions["features.16"].method is None and decisions["features.16"].excluded  # name
    assert decisions["features.18"].method == high  # first pattern in order
    assert decisions["features.11"].method == low and decisions["features.13"].method == low
    assert decisions["features.8"].method == facto_fx.FactoLowRank(inr=INR, pooled_bits=4)  # apply_ratio's default
    assert all(decisions[n].method is None for n in LINEARS)
    assert decisions["features.1"].method is not None  # a ReLU: FactoLowRank does not take it, masks do


@pytest.mark.parametrize(("methods", "message"), [
    ({"feature.3": None}, r"methods names 'feature\.3'.*did you mean"),
    ({"nothing.*": None}, r"pattern 'nothing\.\*' matches no layer"),
    ({"features.0": facto_fx.FactoLowRank()},
     r"FactoLowRank refuses 'features\.0' \(FactoLowRank by name\): input layer"),
    ({"features.1": facto_fx.FactoLowRank()}, r"takes batch_norm, conv2d, linear, scale layers"),
    ({3: None}, "methods keys must be"),
    ({"features.*": facto_fx.PackedMasks(), "classifier.[0]": facto_fx.PackedMasks()},
     r"pattern 'classifier\.\[0\]' matches no dropout/max_pool2d/relu layer"),
])
def test_bad_method_choices_are_named(vgg11, methods, message):
    with pytest.raises(ValueError, match=message):
        facto_fx.compile(vgg11, inr=INR, methods=methods)


def test_last_validates_its_arguments():
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        facto_fx.Last(0)


def test_names_on_layers_that_cannot_be_rewritten_are_errors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match=r"'1' \(FactoLowRank by name\) cannot be rewritten: batch_norm='train'"):
        facto_fx.compile(model, batch_norm="train", methods={"1": facto_fx.FactoLowRank()}, verify=False)
    with pytest.raises(ValueError, match=r"FactoLowRank refuses '2' \(included by name\): grouped convolution"):
        facto_fx.compile(model, include=["2"])
    fmodel = facto_fx.compile(model, methods={"*": facto_fx.FactoLowRank()})
    decisions = {d.layer: d for d in facto_fx.decisions(fmodel)}
    assert decisions["2"].unsupported and "refused: grouped convolution" in decisions["2"].reason


def test_include_packs_masks_even_when_binarizing_is_off():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
    decisions = {d.layer: d for d in facto_fx.decisions(
        facto_fx.compile(model, binarize_activations=False, include=["1"]))}
    assert decisions["1"].method == facto_fx.PackedMasks() and decisions["1"].rewritten
    assert decisions["3"].method is None and decisions["3"].reason == "binarize_activations=False"
