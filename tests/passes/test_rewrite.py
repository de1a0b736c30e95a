"""The rewritten graph computes what the model computes (M = 0), with exact gradients at k = 1."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.func import functional_call

import facto_fx
from facto_fx.layers import LOW_RANK_LAYERS, FactoBatchNorm
from facto_fx.models import cifar_vgg11, fixup_resnet18
from facto_fx.ops import batch_norm_in_mode, max_pool2d, relu
from facto_fx.passes import rewrite as rewrite_pass


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@torch.no_grad()
def _randomize(model: nn.Module, std: float = 0.02) -> nn.Module:
    """Fixup zero-initialises its last convs and fc; perturb so every layer shapes the output."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * std)
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.normal_(0, 0.1)
        elif name.endswith("running_var"):
            buf.uniform_(0.5, 2.0)
    return model


def _torchvision_vgg11():
    return torchvision.models.vgg11(weights=None, num_classes=4), (2, 3, 64, 64)


def _torchvision_resnet18():
    return _randomize(torchvision.models.resnet18(weights=None, num_classes=4)), (2, 3, 64, 64)


def _fixup_resnet18():
    return _randomize(fixup_resnet18(num_classes=4)), (2, 3, 64, 64)


def _cifar_vgg11_bn():
    return _randomize(cifar_vgg11(batch_norm=True)), (2, 3, 32, 32)


@pytest.mark.parametrize("build", [_torchvision_vgg11, _torchvision_resnet18, _fixup_resnet18, _cifar_vgg11_bn])
def test_output_and_input_grad_match_the_model_at_m_zero(build):
    """The source runs in eval mode: fmodel's batch-norm is frozen and its dropout follows eval()."""
    torch.manual_seed(0)
    model, shape = build()
    fmodel = facto_fx.compile(model)
    model.eval()
    fmodel.eval()
    x = torch.randn(*shape, requires_grad=True)
    expected = model(x)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), x)
    actual = fmodel(x)
    (grad_actual,) = torch.autograd.grad(actual.square().sum(), x)
    assert _rel(actual, expected) <= 1e-5
    assert _rel(grad_actual, grad_expected) <= 1e-4


def test_parameter_names_stay_readable():
    fmodel = facto_fx.compile(torchvision.models.vgg11(weights=None, num_classes=4))
    params = dict(fmodel.named_parameters())
    buffers = dict(fmodel.named_buffers())
    assert not params["features.3.weight"].requires_grad
    assert params["features.3.M"].requires_grad and params["features.3.bias"].requires_grad
    assert "features.3.D" in buffers and "features.3.D" not in params
    assert params["features.0.weight"].requires_grad  # the input layer stays dense
    assert params["features.18.weight"].requires_grad  # beyond apply_ratio: dense and trained


def _requires_grad(fmodel: nn.Module) -> dict[str, bool]:
    """Every parameter name -> requires_grad; the frozen ones must be exactly the low-rank W."""
    frozen = {f"{name}.weight" for name, m in fmodel.named_modules() if isinstance(m, LOW_RANK_LAYERS)}
    params = dict(fmodel.named_parameters())
    assert {n for n, p in params.items() if not p.requires_grad} == frozen
    return {n: p.requires_grad for n, p in params.items()}


def test_only_m_biases_input_bn_and_scales_trained():
    fmodel = facto_fx.compile(cifar_vgg11(batch_norm=True), apply_ratio=1.0)
    trainable = {n for n, g in _requires_grad(fmodel).items() if g}
    bn = {n for n in trainable if isinstance(fmodel.get_submodule(n.rpartition(".")[0]), FactoBatchNorm)}
    assert {"features.1.weight", "features.1.bias"} <= bn
    rest = trainable - bn - {"features.0.weight", "features.0.bias"}
    assert rest and all(n.endswith((".M", ".bias")) for n in rest)

    fixup = facto_fx.compile(fixup_resnet18(num_classes=4), apply_ratio=1.0)
    trainable = {n for n, g in _requires_grad(fixup).items() if g}
    assert {"conv1.weight", "layer1.0.scale", "layer1.0.bias1a", "layer2.0.downsample.M", "fc.M"} <= trainable
    assert not fixup.get_parameter("layer2.0.downsample.weight").requires_grad


class Tiny(nn.Module):
    """conv-relu-pool-conv-relu-linear on 8x8 maps: small enough for gradcheck in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)
        self.relu2 = nn.ReLU(inplace=True)
        self.fc = nn.Linear(2 * 4 * 4, 2)

    def forward(self, x):
        x = self.pool(self.relu1(self.conv1(x)))
        return self.fc(torch.flatten(self.relu2(self.conv2(x)), 1))


def _tiny_facto() -> nn.Module:
    torch.manual_seed(0)
    fmodel = facto_fx.compile(Tiny().double(), inr=0.5, lossy_kernel=1, apply_ratio=1.0)
    with torch.no_grad():
        for layer in fmodel.modules():
            if isinstance(layer, LOW_RANK_LAYERS):
                layer.M.normal_(0, 0.3)
    return fmodel


def _trainable(fmodel: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in fmodel.named_parameters() if p.requires_grad}


def test_tiny_model_is_fully_compressed():
    fmodel = _tiny_facto()
    assert set(_trainable(fmodel)) == {"conv1.weight", "conv1.bias", "conv2.M", "conv2.bias", "fc.M", "fc.bias"}


def test_gradcheck_inputs_and_all_trainables_at_lossy_kernel_1():
    fmodel = _tiny_facto()
    params = _trainable(fmodel)
    names = list(params)
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    inputs = (x, *(p.detach().clone().requires_grad_() for p in params.values()))

    def run(x, *values):
        return functional_call(fmodel, dict(zip(names, values, strict=True)), (x,))

    assert torch.autograd.gradcheck(run, inputs)


def _grads(fmodel: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_()
    y = fmodel(x)
    return (y, *torch.autograd.grad(y.square().sum(), (x, *_trainable(fmodel).values())))


def test_pool_before_relu_changes_nothing_but_the_order(monkeypatch):
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    reordered = _tiny_facto()
    order = [n.target for n in reordered.graph.nodes if n.target in (relu, max_pool2d)]
    assert order == [max_pool2d, relu, relu]
    assert "moved after pool" in {d.layer: d for d in facto_fx.decisions(reordered)}["relu1"].reason

    monkeypatch.setattr(rewrite_pass, "pool_before_relu", lambda gm, decisions: None)
    plain = _tiny_facto()
    assert [n.target for n in plain.graph.nodes if n.target in (relu, max_pool2d)] == [relu, max_pool2d, relu]

    for a, b in zip(_grads(reordered, x), _grads(plain, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_lossy_kernel_1_gradients_equal_dense_autograd():
    """grad_M = grad_W · Dᵀ for W + M·D: the chain rule of the dense model with Ω as its weight."""
    fmodel = _tiny_facto()
    dense = facto_fx.export_dense(fmodel)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    y, grad_x, *grads = _grads(fmodel, x)
    facto = dict(zip(_trainable(fmodel), grads, strict=True))

    xd = x.clone().requires_grad_()
    yd = dense(xd)
    yd.square().sum().backward()
    torch.testing.assert_close(y, yd)
    torch.testing.assert_close(grad_x, xd.grad)
    for name in ("conv1.weight", "conv1.bias", "conv2.bias", "fc.bias"):
        torch.testing.assert_close(facto[name], dense.get_parameter(name).grad)
    for layer in ("conv2", "fc"):
        d = fmodel.get_buffer(f"{layer}.D")
        expected = dense.get_parameter(f"{layer}.weight").grad.flatten(1) @ d.T
        torch.testing.assert_close(facto[f"{layer}.M"], expected)


class _FunctionalNorm(nn.Module):
    """A batch-norm called as F.batch_norm (as timm's BatchNormAct2d does)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                        self.training, 0.1, 1e-5)


def test_batch_norm_lossy_trains_on_batch_statistics():
    """batch_norm='lossy': batch-norm modules and functional batch-norm within apply_ratio train on
    batch statistics (the output and the running statistics those of the unrewritten model, step
    for step), the rest stay torch's; eval runs on the running statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), _FunctionalNorm(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None))
    reference = copy.deepcopy(model)
    fmodel = facto_fx.compile(model, batch_norm="lossy", apply_ratio=0.75, verify=False)
    assert type(fmodel.get_submodule("1")) is FactoBatchNorm and fmodel.get_submodule("1").batch_statistics
    assert type(fmodel.get_submodule("4")) is FactoBatchNorm
    assert type(fmodel.get_submodule("10")) is nn.BatchNorm2d  # beyond apply_ratio: torch's
    assert [n.target for n in fmodel.graph.nodes if "batch_norm" in str(n.target)] == [batch_norm_in_mode]

    for _ in range(2):
        x = torch.randn(4, 3, 9, 7)
        fmodel.train(), reference.train()
        torch.testing.assert_close(fmodel(x), reference(x), rtol=1e-5, atol=1e-5)
    for name in ("1", "4", "7", "10"):
        got, expected = model.get_submodule(name), reference.get_submodule(name)
        torch.testing.assert_close(got.running_mean, expected.running_mean)
        torch.testing.assert_close(got.running_var, expected.running_var)
    assert model.get_submodule("1").num_batches_tracked.item() == 2
    fmodel.eval(), reference.eval()
    torch.testing.assert_close(fmodel(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [False, True])
def test_rewritten_layers_keep_the_mode_of_the_modules_they_replace(training):
    """A model compiled in eval mode computes what it did (running statistics, not the batch's),
    and one compiled in train mode trains as it did, before anyone calls .train() / .eval()."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(), m.running_var.uniform_(0.5, 2.0)
    model.train(training)
    reference = copy.deepcopy(model)
    fmodel = facto_fx.compile(model, batch_norm="lossy", apply_ratio=1.0, verify=False)
    assert all(m.training == training for m in fmodel.modules() if isinstance(m, (FactoBatchNorm, *LOW_RANK_LAYERS)))
    x = torch.randn(4, 3, 9, 7)
    torch.testing.assert_close(fmodel(x), reference(x), rtol=1e-5, atol=1e-5)


def test_timm_batch_norm_act_trains_on_batch_statistics_under_lossy():
    """timm's BatchNormAct2d (batch-norm, its batch counter and an activation in one forward)
    becomes Facto's batch-norm on batch statistics plus the activation's op; at lossy kernel 1 the
    output, every gradient, the running statistics and the batch count are torch's, step for step
    (the SiLU left as it is and x̂ uncoded: activation_bits=None, store_bits=None)."""
    layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), layers.BatchNormAct2d(8), nn.Conv2d(8, 8, 3, padding=1),
                          layers.BatchNormAct2d(8, act_layer=nn.SiLU), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 3))
    reference = copy.deepcopy(model)
    fmodel = facto_fx.compile(model, batch_norm="lossy", lossy_kernel=1, apply_ratio=1.0, verify=False,
                              activation_bits=None, store_bits=None)
    assert [n.target for n in fmodel.graph.nodes if "batch_norm" in str(n.target)] == [batch_norm_in_mode] * 2
    assert [n.target for n in fmodel.graph.nodes if n.target is relu] == [relu]

    for _ in range(2):
        x = torch.randn(3, 3, 7, 9)
        x_f, x_r = x.clone().requires_grad_(), x.clone().requires_grad_()
        fmodel(x_f).square().sum().backward()
        reference(x_r).square().sum().backward()
        torch.testing.assert_close(x_f.grad, x_r.grad, rtol=1e-4, atol=1e-5)
    for name in ("1", "3"):
        got, expected = model.get_submodule(name), reference.get_submodule(name)
        for tensor in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(got, tensor), getattr(expected, tensor))
        torch.testing.assert_close(got.weight.grad, expected.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.bias.grad, expected.bias.grad, rtol=1e-4, atol=1e-5)
    assert model.get_submodule("1").num_batches_tracked.item() == 2
    fmodel.eval(), reference.eval()
    torch.testing.assert_close(fmodel(x), reference(x), rtol=1e-5, atol=1e-5)


def test_timm_efficientnet_batch_norms_are_rewritten_under_lossy():
    """Every BatchNormAct2d of a real timm model is Facto's under lossy at apply ratio 1.0 (before,
    each was kept whole for its in-place batch count); the training output at M = 0 is the model's."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", num_classes=10)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    fmodel = facto_fx.compile(model, batch_norm="lossy", apply_ratio=1.0, example_inputs=(x,), verify=False)
    norms = [name for name, m in reference.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 49
    assert sum(n.target is batch_norm_in_mode for n in fmodel.graph.nodes) == len(norms)
    torch.testing.assert_close(fmodel(x), reference(x), rtol=1e-4, atol=1e-4)
    assert model.bn1.num_batches_tracked.item() == 1


def test_batch_norm_train_leaves_bn_alone():
    torch.manual_seed(0)
    model = cifar_vgg11(batch_norm=True)
    fmodel = facto_fx.compile(model, batch_norm="train")
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(type(fmodel.get_submodule(n)) is nn.BatchNorm2d for n in bns)
    x = torch.randn(2, 3, 32, 32)
    report = facto_fx.report(fmodel, x, analytic=True)
    assert {d.layer for d in report.unrewritten if d.kind == "batch_norm"} == set(bns)
    assert all("batch_norm='train'" in d.reason for d in report.unrewritten)
    assert any(d.compress for d in facto_fx.decisions(fmodel) if d.kind == "conv2d")

    before = fmodel.get_buffer("features.1.running_mean").clone()
    torch.testing.assert_close(fmodel(x), model(x), rtol=1e-5, atol=1e-5)
    assert not torch.equal(before, fmodel.get_buffer("features.1.running_mean"))
