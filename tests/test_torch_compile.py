"""A Facto model under torch.compile: one graph, the same outputs and gradients as eager."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
import torch._dynamo
from torch import nn

import facto_fx


class TinyNet(nn.Module):
    """Every Facto op in a few milliseconds: conv, BN, ReLU, max-pool, scale, dropout (p > 0), linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.scale = nn.Parameter(torch.tensor([1.5]))
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = self.pool(self.relu(self.stem(x)))
        x = self.relu(self.bn(self.conv(x))) * self.scale
        return self.fc(self.drop(torch.flatten(self.pool(x), 1)))


def _fmodel(batch_norm: str = "freeze"):
    torch.manual_seed(0)
    fmodel = facto_fx.compile(TinyNet(), apply_ratio=1.0, batch_norm=batch_norm)
    with torch.no_grad():
        for layer in fmodel.modules():
            if hasattr(layer, "M"):
                layer.M.normal_(std=0.1)
    return fmodel


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout mask in eager and compiled runs
    out = model(x)
    out.square().sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def test_facto_model_compiles_to_a_single_graph():
    fmodel = _fmodel()
    explanation = torch._dynamo.explain(fmodel)(torch.randn(2, 3, 16, 16))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_matches_eager(backend):
    """Inductor draws random numbers its own way unless told to draw torch's (fallback_random):
    with it, the codes' stochastic rounding draws eager's numbers."""
    torch._dynamo.reset()
    fmodel = _fmodel()
    x = torch.randn(2, 3, 16, 16)
    eager_out, eager_grads = _grads(fmodel, x)
    with torch._inductor.config.patch(fallback_random=True):
        compiled_out, compiled_grads = _grads(torch.compile(fmodel, fullgraph=True, backend=backend), x)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_statistics_compile_to_one_graph_that_matches_eager(channels_last):
    """batch_norm='lossy' (batch statistics, running statistics updated in forward) under
    aot_eager with fullgraph: the same outputs, gradients and running statistics as eager."""
    torch._dynamo.reset()
    eager, compiled = _fmodel("lossy"), _fmodel("lossy")
    x = torch.randn(2, 3, 16, 16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    eager_out, eager_grads = _grads(eager, x)
    compiled_out, compiled_grads = _grads(torch.compile(compiled, fullgraph=True, backend="aot_eager"), x)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(compiled.bn.running_var, eager.bn.running_var)
    assert compiled.bn.num_batches_tracked.item() == eager.bn.num_batches_tracked.item() == 1


def test_a_traced_batch_norm_act_keeps_counting_batches_when_compiled():
    """timm's BatchNormAct2d under lossy: the graph's own batch count and the batch statistics
    compile into one graph (aot_eager, channels_last) with eager's outputs, gradients and state."""
    layers = pytest.importorskip("timm.layers")

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), layers.BatchNormAct2d(8), nn.Conv2d(8, 8, 3, padding=1),
                              layers.BatchNormAct2d(8, act_layer=nn.SiLU), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(8, 3))
        return model, facto_fx.compile(model, batch_norm="lossy", apply_ratio=1.0, verify=False)

    torch._dynamo.reset()
    (eager_model, eager), (compiled_model, compiled) = build(), build()
    compiled = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
        eager_out, eager_grads = _grads(eager, x)
        compiled_out, compiled_grads = _grads(compiled, x)
        torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-5)
        for name, grad in eager_grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    for name in ("1", "3"):
        got, expected = compiled_model.get_submodule(name), eager_model.get_submodule(name)
        torch.testing.assert_close(got.running_mean, expected.running_mean)
        assert got.num_batches_tracked.item() == expected.num_batches_tracked.item() == 2
    compiled.eval(), eager.eval()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    assert compiled_model.get_submodule("1").num_batches_tracked.item() == 2  # eval counts nothing


SETTINGS = {
    "bf16-autocast": (True, False),
    "channels_last": (False, True),
    "bf16-autocast-channels_last": (True, True),
}


def _real_model(name: str):
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)  # vgg11's classifier has Dropout(0.5)
    fmodel = facto_fx.compile(model, inr=0.1, apply_ratio=1.0)
    with torch.no_grad():
        for layer in fmodel.modules():
            if hasattr(layer, "M"):
                layer.M.normal_(std=0.01)
    return fmodel


def _step(model, x, autocast: bool, seed: int = 0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropout draws the same masks in eager and compiled runs (an opaque op)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    out.float().square().mean().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach().float(), grads


def _compiled_matches_eager(name: str, setting: str, backend: str):
    autocast, channels_last = SETTINGS[setting]
    torch._dynamo.reset()
    fmodel = _real_model(name).train()
    x = torch.randn(2, 3, 32, 32)
    if channels_last:
        fmodel, x = fmodel.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    eager_out, eager_grads = _step(fmodel, x, autocast)
    compiled_out, compiled_grads = _step(torch.compile(fmodel, fullgraph=True, backend=backend), x, autocast)
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(compiled_out, eager_out, **tol)
    assert compiled_grads.keys() == eager_grads.keys() and any(n.endswith(".M") for n in eager_grads)
    for grad_name, grad in eager_grads.items():
        scale = grad.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(compiled_grads[grad_name] / scale, grad / scale, **tol, msg=grad_name)


# vgg11 in each setting alone takes 17 s more and is in the slow run; the suite keeps it combined.
REAL_MODEL_CASES = [("resnet18", setting) for setting in SETTINGS] + [
    pytest.param("vgg11", setting, marks=[] if setting == "bf16-autocast-channels_last" else pytest.mark.slow)
    for setting in SETTINGS
]


@pytest.mark.parametrize(("name", "setting"), REAL_MODEL_CASES)
def test_real_models_compile_under_autocast_and_channels_last(name, setting):
    _compiled_matches_eager(name, setting, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("name", ["resnet18", "vgg11"])
def test_real_models_compile_with_inductor(name, setting):
    _compiled_matches_eager(name, setting, "inductor")


AuxOutputs = namedtuple("AuxOutputs", "logits aux")


class AuxTinyNet(nn.Module):
    """googlenet's shape in a few layers: an auxiliary head run, and returned, in training only."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.aux = nn.Linear(8, 5)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        aux = self.aux(x.mean((2, 3))) if self.training else None
        x = self.fc(torch.relu(self.conv(x)).mean((2, 3)))
        return AuxOutputs(x, aux) if self.training else x


def test_a_model_whose_modes_run_other_graphs_compiles_one_graph_per_mode():
    torch._dynamo.reset()
    torch.manual_seed(0)
    fmodel = facto_fx.compile(AuxTinyNet(), apply_ratio=1.0)
    compiled = torch.compile(fmodel, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 8, 8)
    eager, out = fmodel(x), compiled(x)
    assert type(out) is type(eager) is AuxOutputs
    torch.testing.assert_close(out, eager)
    sum(o.square().sum() for o in out).backward()
    trained = [p for p in fmodel.aux.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)
    fmodel.eval()
    eager, out = fmodel(x), compiled(x)
    assert type(out) is torch.Tensor
    torch.testing.assert_close(out, eager)
    explanation = torch._dynamo.explain(fmodel)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


class ModernTinyNet(nn.Module):
    """Every form a modern CNN needs, in a few layers: a depthwise conv, a squeeze-excite product,
    a channels-last layer norm, a group norm, SiLU, GELU and Hardswish, and a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.se_reduce, self.se_expand = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.norm = nn.LayerNorm(8)
        self.mlp = nn.Linear(8, 16)
        self.proj = nn.Linear(16, 8)
        self.group_norm = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = nn.functional.silu(self.stem(x))
        y = nn.functional.silu(self.dw(x))
        y = y * torch.sigmoid(self.se_expand(nn.functional.silu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        z = self.norm(y.permute(0, 2, 3, 1))
        z = self.proj(nn.functional.gelu(self.mlp(z))).permute(0, 3, 1, 2)
        x = nn.functional.hardswish(self.group_norm(x + z))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("setting", ["fp32", *SETTINGS])
def test_the_new_forms_compile_to_one_graph_that_matches_eager(setting):
    """Activation codes and the 4-bit store on every map they take, under aot_eager with fullgraph:
    eager's outputs and gradients (the store's stochastic rounding draws the same numbers)."""
    autocast, channels_last = SETTINGS.get(setting, (False, False))
    torch._dynamo.reset()
    torch.manual_seed(0)
    fmodel = facto_fx.compile(ModernTinyNet(), apply_ratio=1.0, store_bits=4)
    methods = {decision.layer: type(decision.method) for decision in facto_fx.decisions(fmodel)}
    assert [methods[name] for name in ("dw", "mul", "norm", "group_norm")] == [facto_fx.FixedRate] * 4, methods
    assert [methods[name] for name in ("silu", "gelu", "hardswish")] == [facto_fx.FewBitActivation] * 3, methods
    x = torch.randn(2, 3, 8, 8)
    if channels_last:
        fmodel, x = fmodel.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    eager_out, eager_grads = _step(fmodel, x, autocast)
    compiled_out, compiled_grads = _step(torch.compile(fmodel, fullgraph=True, backend="aot_eager"), x, autocast)
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(compiled_out, eager_out, **tol)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        scale = grad.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(compiled_grads[name] / scale, grad / scale, **tol, msg=name)
