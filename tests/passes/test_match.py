"""The matcher finds every spelling of the supported ops and says why it leaves the others alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import facto_fx
from facto_fx.passes.match import find_matches
from facto_fx.passes.trace import trace


class Toy(nn.Module):
    """One of each pattern the matcher must recognise, on a 2x3x16x16 input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu_aliased = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu_inplace = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.silu = nn.SiLU()
        self.scale = nn.Parameter(torch.full((1,), 0.5))
        self.shared_conv = nn.Conv2d(8, 8, 1)
        self.shared_relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = x + self.relu_aliased(x)  # x is read after being modified in place
        x = F.relu(self.conv2(x))
        x = self.relu_inplace(self.bn(x))
        x = torch.relu(self.pool(x))
        x = self.grouped(x).relu()
        x = F.max_pool2d(x, 2)
        x = self.silu(x) * self.scale
        x = self.shared_relu(self.shared_conv(x))
        x = self.shared_relu(self.shared_conv(x))
        x = self.drop(torch.flatten(x, 1))
        return self.fc(x)


EXPECTED_KINDS = {
    "conv1": "conv2d",
    "relu_aliased": "relu",
    "conv2": "conv2d",
    "relu": "relu",  # F.relu
    "bn": "batch_norm",
    "relu_inplace": "relu",
    "pool": "max_pool2d",
    "relu_1": "relu",  # torch.relu
    "grouped": "conv2d",
    "relu_2": "relu",  # Tensor.relu
    "max_pool2d": "max_pool2d",  # F.max_pool2d
    "silu": "SiLU",
    "scale": "scale",  # x * self.scale
    "shared_conv": "conv2d",
    "shared_relu": "relu",
    "shared_conv#2": "conv2d",
    "shared_relu#2": "relu",
    "drop": "dropout",
    "fc": "linear",
}


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    model = Toy()
    fmodel = facto_fx.compile(model, apply_ratio=1.0)
    return model, fmodel, {d.layer: d for d in facto_fx.decisions(fmodel)}


def test_every_spelling_found_with_its_kind(toy):
    _, _, by_layer = toy
    assert {layer: d.kind for layer, d in by_layer.items()} == EXPECTED_KINDS


def test_every_relu_and_pool_spelling_rewritten(toy):
    _, _, by_layer = toy
    for layer in ("relu", "relu_inplace", "relu_1", "relu_2", "pool", "max_pool2d", "scale", "drop", "bn"):
        assert by_layer[layer].rewritten, layer


@pytest.mark.parametrize(
    ("layer", "reason"),
    [("grouped", "grouped convolution"), ("silu", "SiLU"), ("relu_aliased", "in-place")],
)
def test_unsupported_layers_left_alone_with_reason(toy, layer, reason):
    _, fmodel, by_layer = toy
    decision = by_layer[layer]
    assert decision.unsupported and not decision.rewritten and not decision.compress
    assert reason in decision.reason
    assert decision in facto_fx.report(fmodel, torch.randn(2, 3, 16, 16), analytic=True).unrewritten


def test_grouped_conv_stays_a_trainable_conv(toy):
    _, fmodel, _ = toy
    grouped = fmodel.get_submodule("grouped")
    assert type(grouped) is nn.Conv2d and grouped.weight.requires_grad


def test_shared_stateless_relu_rewritten_at_both_calls(toy):
    _, _, by_layer = toy
    assert by_layer["shared_relu"].rewritten and by_layer["shared_relu#2"].rewritten


def test_shared_conv_left_dense(toy):
    """Swapping a module used at two call sites for one of them would change the other."""
    _, fmodel, by_layer = toy
    for layer in ("shared_conv", "shared_conv#2"):
        assert by_layer[layer].unsupported and not by_layer[layer].rewritten
        assert "called 2 times" in by_layer[layer].reason
    assert type(fmodel.get_submodule("shared_conv")) is nn.Conv2d


def test_rewritten_toy_computes_the_same(toy):
    """In particular the aliased in-place ReLU keeps its in-place effect on `x`."""
    model, fmodel, _ = toy
    model.eval()
    fmodel.eval()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    expected = model(x)
    (grad_expected,) = torch.autograd.grad(expected.sum(), x)
    actual = fmodel(x)
    (grad_actual,) = torch.autograd.grad(actual.sum(), x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_actual, grad_expected, rtol=1e-4, atol=1e-6)


def _kinds(model: nn.Module) -> dict[str, tuple[str, str | None]]:
    return {m.layer: (m.kind, m.unsupported) for m in find_matches(trace(model))}


class _Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn
        self.s = nn.Parameter(torch.ones(1))
        self.per_channel = nn.Parameter(torch.ones(1, 4, 1, 1))

    def forward(self, x):
        return self.fn(self, x)


def test_scale_parameter_on_either_side():
    matches = _kinds(_Fn(lambda m, x: m.s * x))
    assert matches == {"s": ("scale", None)}


def test_per_channel_multiply_is_not_a_scale():
    assert _kinds(_Fn(lambda m, x: x * m.per_channel)) == {}


def test_functional_inplace_relu_with_later_read_unsupported():
    matches = _kinds(_Fn(lambda m, x: F.relu(x, inplace=True) + x))
    assert matches["relu"][0] == "relu" and "in-place" in matches["relu"][1]


def test_functional_dropout_unsupported():
    """Its `training` flag is baked into the trace, so it cannot follow fmodel.train()/eval()."""
    matches = _kinds(_Fn(lambda m, x: F.dropout(x, 0.5, m.training)))
    assert matches["dropout"][0] == "dropout" and "training flag" in matches["dropout"][1]


@pytest.mark.parametrize(("module", "supported"), [
    (nn.MaxPool2d(3, 2, 1), True),
    (nn.MaxPool2d(2, return_indices=True), False),
    (nn.MaxPool2d(17), False),
])
def test_max_pool_window_limits(module, supported):
    kind, problem = _kinds(nn.Sequential(module))["0"]
    assert kind == "max_pool2d" and (problem is None) == supported


def test_inplace_relu_seen_through_an_earlier_view_is_not_rewritten():
    class ViewThenInplace(nn.Module):
        def forward(self, x):
            flat = x.view(x.shape[0], -1)
            y = F.relu(x, inplace=True)
            return y.sum() + flat.sum()

    model = ViewThenInplace()
    fmodel = facto_fx.compile(model)
    x = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(fmodel(x.clone()), model(x.clone()))
