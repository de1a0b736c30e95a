"""The matcher finds every spelling of the supported ops and says why it leaves the others alone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import facto_fx
from facto_fx.passes.match import find_matches, shape_arithmetic
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
    "silu": "activation",
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
    fmodel = facto_fx.compile(model, apply_ratio=1.0, store_bits=None)  # what Facto's own operators leave
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
    [("grouped", "grouped convolution"), ("relu_aliased", "in-place")],
)
def test_unsupported_layers_left_alone_with_reason(toy, layer, reason):
    _, fmodel, by_layer = toy
    decision = by_layer[layer]
    assert decision.unsupported and not decision.rewritten and not decision.compress
    assert reason in decision.reason
    assert decision in facto_fx.report(fmodel, torch.randn(2, 3, 16, 16), analytic=True).unrewritten


def test_other_activations_get_a_few_bit_code(toy):
    _, _, by_layer = toy
    assert by_layer["silu"].rewritten and by_layer["silu"].label == "fewbit"


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
    """In particular the aliased in-place ReLU keeps its in-place effect on `x`. (Its SiLU keeps a
    2-bit code, whose gradient is approximate: compiled here without codes.)"""
    model, _, _ = toy
    fmodel = facto_fx.compile(model, apply_ratio=1.0, activation_bits=None)
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
    """A product with a many-element parameter (layer scale) is a kept multiply, not a Facto scale."""
    assert _kinds(_Fn(lambda m, x: x * m.per_channel)) == {"mul": ("mul", None)}


def test_functional_inplace_relu_with_later_read_unsupported():
    matches = _kinds(_Fn(lambda m, x: F.relu(x, inplace=True) + x))
    assert matches["relu"][0] == "relu" and "in-place" in matches["relu"][1]


def test_functional_dropout_follows_the_mode():
    """F.dropout(x, p, self.training): the trace reads the flag at run time, so it is rewritten and
    follows fmodel.train() / .eval() like the original."""
    model = _Fn(lambda m, x: F.dropout(x, 0.5, m.training))
    assert _kinds(model) == {"dropout": ("dropout", None)}
    fmodel = facto_fx.compile(model, example_inputs=(torch.randn(2, 8),))
    x = torch.ones(64, 8, requires_grad=True)
    assert torch.equal(fmodel.eval()(x), x)
    dropped = fmodel.train()(x)
    assert 0 < (dropped == 0).sum() < x.numel() and set(dropped.unique().tolist()) == {0.0, 2.0}


@pytest.mark.parametrize(("module", "supported"), [
    (nn.MaxPool2d(3, 2, 1), True),
    (nn.MaxPool2d(2, return_indices=True), False),
    (nn.MaxPool2d(17), False),
])
def test_max_pool_window_limits(module, supported):
    """return_indices is the matcher's refusal, a 17x17 window (9-bit codes) the packed masks'."""
    decision = facto_fx.decisions(facto_fx.compile(nn.Sequential(module), verify=False))[0]
    assert decision.kind == "max_pool2d" and decision.rewritten == supported
    assert decision.unsupported != supported


def test_inplace_relu_seen_through_an_earlier_view_is_not_rewritten():
    class ViewThenInplace(nn.Module):
        def forward(self, x):
            flat = x.view(x.shape[0], -1)
            y = F.relu(x, inplace=True)
            return y.sum() + flat.sum()

    model = ViewThenInplace()
    x = torch.randn(2, 4, 4, 4)
    fmodel = facto_fx.compile(model, example_inputs=(x.clone(),))
    torch.testing.assert_close(fmodel(x.clone()), model(x.clone()))


# Subclasses of the matched module types that change what the base class computes. None may be
# swapped whole; the pass traces into them and matches their functional calls one by one.


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in miniature: batch-norm and an activation in one forward."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         self.momentum, self.eps)
        return self.act(x)


class PadInForward(nn.Conv2d):
    """Asymmetric padding applied in forward from static sizes (traceable)."""

    def forward(self, x):
        return self._conv_forward(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias)


class SamePadFromShape(nn.Conv2d):
    """Padding computed from the input's shape with Python math, like timm's Conv2dSame: untraceable."""

    def forward(self, x):
        size, stride, kernel = x.shape[-1], self.stride[0], self.kernel_size[0]
        pad = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        return F.conv2d(F.pad(x, (pad // 2, pad - pad // 2) * 2), self.weight, self.bias, self.stride)


class StandardizedConv(nn.Conv2d):
    """Weight standardisation, like timm's StdConv2d: the weight is computed in forward."""

    def forward(self, x):
        flat = self.weight.reshape(1, self.out_channels, -1)
        weight = F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


class PlainConv(nn.Conv2d):
    """A subclass that changes nothing: rewritten like nn.Conv2d."""


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class LeakyReLU(nn.ReLU):
    def forward(self, x):
        return F.leaky_relu(x, 0.1)


class AveragingPool(nn.MaxPool2d):
    def forward(self, x):
        return F.avg_pool2d(x, self.kernel_size, self.stride)


class HalfDropout(nn.Dropout):
    def forward(self, x):
        return F.dropout(x, self.p / 2, self.training)


class Subclassed(nn.Module):
    """Every override above, on a 2x3x16x16 input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pad_conv = PadInForward(8, 8, 2)
        self.bn1 = BatchNormAct(8)
        self.same_conv = SamePadFromShape(8, 8, 3, stride=2)
        self.std_conv = StandardizedConv(8, 8, 3, padding=1)
        self.bn2 = BatchNormAct(8)
        self.plain = PlainConv(8, 8, 3, padding=1)
        self.pool = AveragingPool(2)
        self.act = LeakyReLU()
        self.drop = HalfDropout(0.5)
        self.fc = ScaledLinear(8 * 4 * 4, 10)

    def forward(self, x):
        x = self.bn1(self.pad_conv(self.stem(x)))
        x = self.bn2(self.std_conv(self.same_conv(x)))
        x = self.act(self.pool(self.plain(x)))
        return self.fc(self.drop(torch.flatten(x, 1)))


def _trained_statistics(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so frozen batch-norm is not the identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    return model


@pytest.fixture(scope="module")
def subclassed():
    torch.manual_seed(0)
    model = _trained_statistics(Subclassed())
    fmodel = facto_fx.compile(model, apply_ratio=1.0, include=["fc"])  # after dense convs: not by default
    return model, fmodel, {d.layer: d for d in facto_fx.decisions(fmodel)}


def test_subclasses_compute_the_original_function_and_train(subclassed):
    model, fmodel, _ = subclassed
    x = torch.randn(2, 3, 16, 16)
    model.eval(), fmodel.eval()
    with torch.enable_grad():
        torch.testing.assert_close(fmodel(x), model(x), rtol=1e-5, atol=1e-6)
    fmodel.train()
    fmodel(x).square().mean().backward()
    trained = [p for p in fmodel.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    fmodel.zero_grad(set_to_none=True)


def test_subclasses_matched_by_their_functional_calls(subclassed):
    _, fmodel, by_layer = subclassed
    for layer, kind in [("pad_conv", "conv2d"), ("plain", "conv2d"), ("fc", "linear"), ("bn1", "batch_norm"),
                        ("bn2", "batch_norm"), ("bn1.act", "relu"), ("dropout", "dropout")]:
        assert by_layer[layer].kind == kind and by_layer[layer].rewritten, layer
    assert isinstance(fmodel.get_submodule("pad_conv"), facto_fx.layers.FactoConv2d)
    assert isinstance(fmodel.get_submodule("fc"), facto_fx.layers.FactoLinear)
    assert "cannot trace" in by_layer["same_conv"].reason and not by_layer["same_conv"].rewritten
    assert "weight is computed" in by_layer["std_conv"].reason and not by_layer["std_conv"].rewritten
    leaky = by_layer["leaky_relu"]
    assert leaky.kind == "activation" and leaky.label == "fewbit" and leaky.reason == "derivative in 1 bit (exact)"
    assert "max_pool2d" not in {d.kind for d in by_layer.values()}


@pytest.mark.parametrize("name", ["pad_conv", "bn1", "pool", "act", "drop", "fc"])
def test_a_subclass_kept_whole_is_never_swapped(name):
    torch.manual_seed(0)
    model = _trained_statistics(Subclassed())
    fmodel = facto_fx.compile(model, apply_ratio=1.0, leaf_modules=[name])
    decision = {d.layer: d for d in facto_fx.decisions(fmodel)}[name]
    assert "overrides" in decision.reason and not decision.rewritten
    assert type(fmodel.get_submodule(name)) is type(model.get_submodule(name))


def test_functional_conv_on_a_module_with_other_state_is_left_dense():
    class ConvWithGain(nn.Conv2d):
        def __init__(self) -> None:
            super().__init__(4, 4, 3, padding=1)
            self.gain = nn.Parameter(torch.full((1, 4, 1, 1), 2.0))

        def forward(self, x):
            return super().forward(x) * self.gain

    model = nn.Sequential(nn.Conv2d(3, 4, 1), ConvWithGain())
    fmodel = facto_fx.compile(model, apply_ratio=1.0)
    decision = {d.layer: d for d in facto_fx.decisions(fmodel)}["1"]
    assert "also used by" in decision.reason and not decision.rewritten


def test_a_torch_module_kept_whole_is_listed_with_why():
    """torch.fx calls torch.nn modules such as nn.LSTM or nn.TransformerEncoder whole: the pass
    never sees their layers, and the decisions and the report say so."""

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.lstm = nn.LSTM(8, 8, batch_first=True)
            self.flat = nn.Flatten()
            self.fc = nn.Linear(8 * 4, 2)

        def forward(self, x):
            return self.fc(self.flat(self.lstm(self.embed(x))[0]))

    x = torch.randint(0, 10, (2, 4))
    with pytest.warns(facto_fx.FactoSavesLittleWarning):
        fmodel = facto_fx.compile(Recurrent(), example_inputs=(x,))
    by_layer = {d.layer: d for d in facto_fx.decisions(fmodel)}
    assert "flat" not in by_layer  # a torch module without weights is an op like any other
    for layer, cls in (("embed", "Embedding"), ("lstm", "LSTM")):
        assert by_layer[layer].kind == "opaque" and by_layer[layer].unsupported and not by_layer[layer].rewritten
        assert by_layer[layer].reason.startswith(f"{cls} is a torch.nn module torch.fx calls whole")
    assert "lstm (opaque): LSTM is a torch.nn module" in str(facto_fx.report(fmodel, x))


class Patches(nn.Module):
    """ViT's patch arithmetic: products of sizes (h // p * (w // p)), and a map times one of them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 2, stride=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        n, _, h, w = x.shape
        y = self.conv(x).reshape(n, 8, h // 2 * (w // 2)) * x.size(1)
        gate = torch.sigmoid(y)
        return self.fc((y * gate).mean(2))


@pytest.mark.parametrize("example", [False, True])
def test_products_of_sizes_are_not_feature_maps(example):
    """Only y * gate is a product of maps for the store; with store_bits the model still runs
    exactly (with or without the trace's recorded shapes)."""
    model = Patches()
    x = torch.randn(2, 3, 8, 8)
    fmodel = facto_fx.compile(model, store_bits=8, example_inputs=x if example else None)
    assert [d.rewritten for d in facto_fx.decisions(fmodel) if d.kind == "mul"] == [True]
    (stored,) = [n for n in fmodel.graph.nodes if n.target is torch.ops.facto.quantized_mul.default
                 or getattr(n.target, "__name__", "") == "quantized_mul"]
    assert {a.target for a in stored.args if isinstance(a, torch.fx.Node)} >= {torch.sigmoid}
    assert shape_arithmetic(next(n for n in fmodel.graph.nodes if n.name == "floordiv"))
    model.eval(), fmodel.eval()
    torch.testing.assert_close(fmodel(x), model(x), rtol=0, atol=0)
