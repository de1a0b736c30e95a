"""fixup-ResNet: shapes, FX traceability, the scale-layer pattern and the Fixup init facts."""

from __future__ import annotations

import operator
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from facto_fx.models import (
    MODELS,
    FixupBasicBlock,
    FixupBottleneck,
    FixupResNet,
    fixup_resnet18,
    fixup_resnet34,
    fixup_resnet50,
)

CONSTRUCTORS: dict[str, tuple[Callable[..., FixupResNet], int]] = {
    # name: (constructor, number of residual blocks)
    "fixup_resnet18": (fixup_resnet18, 8),
    "fixup_resnet34": (fixup_resnet34, 16),
    "fixup_resnet50": (fixup_resnet50, 16),
}


@pytest.fixture(scope="module")
def models() -> dict[str, FixupResNet]:
    torch.manual_seed(0)
    return {name: ctor(num_classes=10) for name, (ctor, _) in CONSTRUCTORS.items()}


def _perturb(model: nn.Module, seed: int = 0) -> None:
    """Give the zero-initialised weights random values so outputs are not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _last_convs(model: FixupResNet) -> list[nn.Conv2d]:
    out: list[nn.Conv2d] = []
    for m in model.modules():
        if isinstance(m, FixupBasicBlock):
            out.append(m.conv2)
        elif isinstance(m, FixupBottleneck):
            out.append(m.conv3)
    return out


def test_registry() -> None:
    for name, (ctor, _) in CONSTRUCTORS.items():
        assert MODELS[name] is ctor


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_output_shape(models: dict[str, FixupResNet], name: str) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert models[name](x).shape == (2, 10)


def test_default_num_classes_and_in_channels() -> None:
    model = fixup_resnet18(in_channels=1)
    assert model.fc.out_features == 1000
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 1000)


def test_no_batch_norm(models: dict[str, FixupResNet]) -> None:
    for model in models.values():
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_fixup_init(models: dict[str, FixupResNet]) -> None:
    for model in models.values():
        last = _last_convs(model)
        assert len(last) == model.num_layers
        assert all(torch.count_nonzero(c.weight) == 0 for c in last)
        assert torch.count_nonzero(model.fc.weight) == 0
        assert torch.count_nonzero(model.fc.bias) == 0
        # At init the output is the fc bias: zeros.
        with torch.no_grad():
            y = model(torch.randn(2, 3, 64, 64))
        assert torch.equal(y, torch.zeros_like(y))


def test_fixup_init_scaling() -> None:
    """First-conv std is He-std * L^(-1/2) (basic) or L^(-1/4) (bottleneck), L = #blocks."""
    torch.manual_seed(0)
    for model, exponent, conv_name in (
        (fixup_resnet34(), -0.5, "conv1"),
        (fixup_resnet50(), -0.25, "conv2"),
    ):
        conv = getattr(model.layer3[1], conv_name)
        fan_out = conv.weight.shape[0] * conv.weight.shape[2] * conv.weight.shape[3]
        expected = (2.0 / fan_out) ** 0.5 * model.num_layers**exponent
        assert conv.weight.std().item() == pytest.approx(expected, rel=0.05)
        ds = model.layer2[0].downsample
        assert isinstance(ds, nn.Conv2d)
        assert ds.weight.std().item() == pytest.approx((2.0 / ds.out_channels) ** 0.5, rel=0.05)


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_symbolic_trace_matches_eager(name: str) -> None:
    torch.manual_seed(1)
    ctor, _ = CONSTRUCTORS[name]
    model = ctor(num_classes=10)
    _perturb(model)
    gm = fx.symbolic_trace(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        got = gm(x)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_scale_layers_in_graph(models: dict[str, FixupResNet], name: str) -> None:
    _, n_blocks = CONSTRUCTORS[name]
    gm = fx.symbolic_trace(models[name])
    scale_targets = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not operator.mul:
            continue
        other = node.args[1]
        if isinstance(other, fx.Node) and other.op == "get_attr":
            param = gm.get_parameter(other.target)
            assert param.numel() == 1
            scale_targets.append(other.target)
    assert len(scale_targets) == n_blocks
    assert "layer1.0.scale" in scale_targets
    assert all(t.endswith(".scale") for t in scale_targets)


def test_sgd_step_and_gradient_flow() -> None:
    torch.manual_seed(0)
    model = fixup_resnet18(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 3, 64, 64)
    target = torch.tensor([0, 1])

    loss0 = F.cross_entropy(model(x), target)
    # Zero logits at init: the loss is log(num_classes).
    assert loss0.item() == pytest.approx(torch.log(torch.tensor(10.0)).item(), rel=1e-6)
    loss0.backward()
    # fc.weight is zero, so the first backward reaches only the fc layer and bias2 path;
    # the residual branches get their gradient from the second step on (a Fixup property).
    assert torch.count_nonzero(model.fc.weight.grad) > 0
    assert torch.count_nonzero(model.fc.bias.grad) > 0
    opt.step()
    opt.zero_grad()

    loss1 = F.cross_entropy(model(x), target)
    assert loss1.item() < loss0.item()
    loss1.backward()
    last = _last_convs(model)
    assert any(torch.count_nonzero(c.weight.grad) > 0 for c in last)


def test_bad_layers() -> None:
    with pytest.raises(ValueError, match="4 stages"):
        FixupResNet(FixupBasicBlock, [2, 2, 2])
