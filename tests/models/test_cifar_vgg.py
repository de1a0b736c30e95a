"""CIFAR-size VGG: shapes, FX traceability, options and init."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import fx, nn

from facto_fx.models import (
    CIFAR_VGG_CFGS,
    MODELS,
    CifarVGG,
    cifar_vgg11,
    cifar_vgg13,
    cifar_vgg16,
    cifar_vgg19,
)

CONSTRUCTORS: dict[str, tuple[Callable[..., CifarVGG], int]] = {
    # name: (constructor, number of convs)
    "cifar_vgg11": (cifar_vgg11, 8),
    "cifar_vgg13": (cifar_vgg13, 10),
    "cifar_vgg16": (cifar_vgg16, 13),
    "cifar_vgg19": (cifar_vgg19, 16),
}


def _count(model: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def test_registry() -> None:
    for name, (ctor, _) in CONSTRUCTORS.items():
        assert MODELS[name] is ctor


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_shape_structure_and_trace(name: str) -> None:
    torch.manual_seed(0)
    ctor, n_convs = CONSTRUCTORS[name]
    model = ctor()
    assert _count(model, nn.Conv2d) == n_convs
    assert _count(model, nn.MaxPool2d) == 5
    assert _count(model, nn.BatchNorm2d) == 0
    assert _count(model, nn.Dropout) == 0
    x = torch.randn(2, 3, 32, 32)
    gm = fx.symbolic_trace(model)
    with torch.no_grad():
        expected = model(x)
        got = gm(x)
    assert expected.shape == (2, 10)
    torch.testing.assert_close(got, expected)


def test_features_are_512() -> None:
    model = cifar_vgg11()
    with torch.no_grad():
        feats = model.features(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 512, 1, 1)
    head = list(model.classifier)
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert head[0].in_features == 512 and head[0].out_features == 512


def test_batch_norm_and_trace() -> None:
    torch.manual_seed(0)
    model = cifar_vgg11(batch_norm=True, num_classes=100).eval()
    assert _count(model, nn.BatchNorm2d) == 8
    gm = fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
        assert model(x).shape == (2, 100)


def test_dropout() -> None:
    model = cifar_vgg16(dropout=0.5)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 1 and drops[0].p == 0.5
    assert isinstance(model.classifier[2], nn.Dropout)
    with pytest.raises(ValueError, match="dropout"):
        cifar_vgg11(dropout=1.0)


def test_in_channels_one() -> None:
    model = cifar_vgg13(in_channels=1)
    assert model.features[0].in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_unknown_cfg() -> None:
    with pytest.raises(ValueError) as info:
        CifarVGG("vgg12")
    msg = str(info.value)
    assert "vgg12" in msg
    for valid in CIFAR_VGG_CFGS:
        assert valid in msg


def test_init() -> None:
    torch.manual_seed(0)
    model = cifar_vgg19(batch_norm=True)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert torch.count_nonzero(m.bias) == 0
            fan_out = m.out_channels * 9
            assert m.weight.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.1)
        elif isinstance(m, nn.Linear):
            assert torch.count_nonzero(m.bias) == 0


def test_backward() -> None:
    torch.manual_seed(0)
    model = cifar_vgg11()
    loss = model(torch.randn(2, 3, 32, 32)).square().mean()
    loss.backward()
    first = model.features[0]
    assert isinstance(first, nn.Conv2d)
    assert first.weight.grad is not None and torch.count_nonzero(first.weight.grad) > 0
