"""The tracer: untraceable parts stay opaque instead of stopping the model, the graph follows
train / eval mode like the model does, and tracing leaves the model as it found it."""

from __future__ import annotations

import copy
import inspect
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import facto_fx
from facto_fx.passes.mode_graph import ONLY, two_modes
from facto_fx.passes.trace import OPAQUE_META, trace


class Gate(nn.Module):
    """Data-dependent control flow: symbolic tracing cannot follow the branch."""

    def forward(self, x):
        if x.sum() > 0:  # the line the error must point at
            return x
        return -x


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = Gate()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv3(torch.relu(self.conv2(self.gate(self.conv1(x)))))


def _gate_line() -> str:
    """file:line of the `if` in Gate.forward."""
    lines, first = inspect.getsourcelines(Gate.forward)
    offset = next(i for i, text in enumerate(lines) if "x.sum() > 0" in text)
    return f"{inspect.getsourcefile(Gate)}:{first + offset}"


def _strict_error() -> str:
    with pytest.raises(facto_fx.FactoTraceError) as info:
        facto_fx.compile(Gated(), strict=True)
    return str(info.value)


def test_strict_trace_error_points_at_source_line_and_names_the_submodule():
    message = _strict_error()
    assert _gate_line() in message
    assert "'gate'" in message and "leaf_modules=['gate']" in message


def test_untraceable_submodule_is_kept_opaque_and_the_rest_compressed():
    torch.manual_seed(0)
    model = Gated()
    fmodel = facto_fx.compile(model, apply_ratio=1.0)
    by_layer = {d.layer: d for d in facto_fx.decisions(fmodel)}
    assert by_layer["gate"].kind == "opaque" and not by_layer["gate"].rewritten
    assert _gate_line() in by_layer["gate"].reason
    assert by_layer["conv2"].rewritten and by_layer["conv3"].rewritten
    report = facto_fx.report(fmodel, torch.randn(2, 3, 8, 8))
    assert any(d.layer == "gate" for d in report.unrewritten) and "gate (opaque)" in str(report)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    for sample in (x, -x):  # both branches of the gate, decided at run time
        torch.testing.assert_close(fmodel(sample), model(sample), rtol=1e-5, atol=1e-6)


def test_error_in_the_root_forward_still_raises():
    class RootBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x) if x.mean() > 0 else x

    with pytest.raises(facto_fx.FactoTraceError, match="RootBranch.forward"):
        facto_fx.compile(RootBranch())


def test_leaf_module_makes_it_traceable_with_the_same_output():
    torch.manual_seed(0)
    model = Gated()
    fmodel = facto_fx.compile(model, leaf_modules=["gate"], apply_ratio=1.0, strict=True)
    assert any(n.op == "call_module" and n.target == "gate" for n in fmodel.graph.nodes)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    torch.testing.assert_close(fmodel(x), model(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fmodel(-x), model(-x), rtol=1e-5, atol=1e-6)


def test_unknown_leaf_module_rejected():
    with pytest.raises(ValueError, match="gat"):
        facto_fx.compile(Gated(), leaf_modules=["gat"])


class HalveInTraining(nn.Module):
    """Different code in train and eval mode, like timm's DropPath or DropBlock."""

    def forward(self, x):
        if self.training:
            return x * 0.5
        return x


class ModeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.halve = HalveInTraining()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        x = self.halve(self.conv1(x))
        return F.dropout(self.conv2(x), 0.5, self.training)  # the root's own flag


@pytest.mark.parametrize("mode_at_compile", ["train", "eval"])
def test_graph_follows_the_mode_whatever_the_mode_at_compile(mode_at_compile):
    torch.manual_seed(0)
    model = ModeNet().train(mode_at_compile == "train")
    gm = trace(model)
    assert gm.meta[OPAQUE_META].keys() == {"halve"}
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(gm.eval()(x), model.eval()(x))
    model.train(), gm.train()
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    torch.testing.assert_close(gm(x), expected)
    assert (expected == 0).any()


def test_a_root_forward_that_differs_by_mode_runs_the_nodes_of_its_mode():
    class RootMode(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            x = self.conv(x)
            return x * 2 if self.training else x

    torch.manual_seed(0)
    model = RootMode()
    gm = trace(model)
    assert two_modes(gm.graph) and gm.meta[OPAQUE_META] == {}
    x = torch.randn(2, 3, 4, 4)
    for training in (True, False):
        model.train(training), gm.train(training)
        torch.testing.assert_close(gm(x), model(x))


Outputs = namedtuple("Outputs", "logits aux")


class AuxNet(nn.Module):
    """googlenet in miniature: an auxiliary head run only in training, whose logits the forward
    returns in a namedtuple only then (torchvision's `GoogLeNetOutputs`)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.aux = nn.Sequential(nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5),
                                 nn.Linear(4, 3))
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        aux = self.aux(x) if self.training else None
        x = self.head(F.dropout(torch.relu(self.body(x)).mean((2, 3)), 0.5, self.training))
        return Outputs(x, aux) if self.training else x


def test_an_auxiliary_head_runs_in_training_only_and_the_rest_is_traced_once():
    torch.manual_seed(0)
    model = AuxNet()
    gm = trace(model)
    assert gm.meta[OPAQUE_META] == {}  # nothing kept whole: the aux head is traced, in the train graph
    assert sum(n.target == "body" for n in gm.graph.nodes) == 1
    calls = []
    model.aux[0].register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 8, 8)
    gm.eval(), model.eval()
    torch.testing.assert_close(gm(x), model(x))
    assert not calls  # eval runs none of the head
    gm.train(), model.train()
    reference = copy.deepcopy(model)
    torch.manual_seed(1)
    out = gm(x)
    assert type(out) is Outputs and len(calls) == 1
    torch.manual_seed(1)
    expected = reference(x)
    torch.testing.assert_close(out, expected)  # dropout on the same draws; statistics updated alike
    torch.testing.assert_close(model.stem[1].running_mean, reference.stem[1].running_mean)


class Distilled(nn.Module):
    """timm's distilled heads: two logits in training, their mean (nodes of its own) in eval."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 2)
        self.head_dist = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x).mean((2, 3))
        a, b = self.head(x), self.head_dist(x)
        return (a, b) if self.training else (a + b) / 2


def test_nodes_of_the_eval_mode_only_are_kept_for_it():
    torch.manual_seed(0)
    model = Distilled()
    gm = trace(model)
    only = {n.name: n.meta[ONLY] for n in gm.graph.nodes if ONLY in n.meta}
    assert set(only.values()) == {False}  # the mean, and the eval result
    x = torch.randn(2, 3, 6, 6)
    for training in (True, False):
        model.train(training), gm.train(training)
        torch.testing.assert_close(gm(x), model(x))
    gm_copy = copy.deepcopy(gm)
    torch.testing.assert_close(gm_copy(x), model(x))
    gm_copy.train()
    assert isinstance(gm_copy(x), tuple)


def test_tracing_leaves_modes_and_buffers_as_they_were():
    class Counter(nn.Module):
        """Updates a buffer in place, which a graph would silently drop."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, x):
            self.calls.add_(1)
            return x

    model = nn.Sequential(nn.Conv2d(3, 3, 1), Counter(), nn.BatchNorm2d(3))
    model[2].eval()
    gm = trace(model, freeze_batch_norm=True)
    assert model.training and not model[2].training
    assert model[1].calls.item() == 0 and model[2].num_batches_tracked.item() == 0
    assert "'calls' in place" in gm.meta[OPAQUE_META]["1"]
    gm(torch.randn(1, 3, 4, 4))
    assert model[1].calls.item() == 1  # the opaque call still runs it


def test_hooks_and_parametrizations_keep_the_module_whole():
    torch.manual_seed(0)
    seen = []
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 2, 1))
    model[1].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    nn.utils.parametrizations.weight_norm(model[3])
    fmodel = facto_fx.compile(model, apply_ratio=1.0)
    by_layer = {d.layer: d for d in facto_fx.decisions(fmodel)}
    assert "forward hooks" in by_layer["1"].reason and not by_layer["1"].rewritten
    assert "parametrized (weight)" in by_layer["3"].reason and not by_layer["3"].rewritten
    assert by_layer["4"].rewritten
    seen.clear()
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(fmodel(x), model(x))
    assert len(seen) == 2  # the hook ran in both models
    fmodel(x).sum().backward()
    assert model[3].parametrizations.weight.original1.grad is not None


class _BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in miniature: torch's own counting and averaging, then an activation."""

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, factor,
                         self.eps)
        return torch.relu(x)


@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_a_traced_batch_norm_counts_batches_in_training_only(momentum):
    """The in-place count in a batch-norm forward the trace enters runs once per training call of
    the graph, as in the model (not once at trace time), and never in eval."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _BatchNormAct(4, momentum=momentum))
    reference = copy.deepcopy(model)
    gm = trace(model)
    assert model[1].num_batches_tracked.item() == 0 and "1" not in gm.meta[OPAQUE_META]
    x = torch.randn(2, 3, 5, 5)
    for _ in range(3):
        torch.testing.assert_close(gm(x), reference(x))
    gm.eval(), reference.eval()
    torch.testing.assert_close(gm(x), reference(x))
    assert model[1].num_batches_tracked.item() == reference[1].num_batches_tracked.item() == 3
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(model[1], name), getattr(reference[1], name))


def test_a_batch_norm_averaging_by_its_count_is_kept_whole():
    """momentum=None averages with 1 / count, a factor the trace would freeze: kept as one call."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _BatchNormAct(4, momentum=None))
    gm = trace(model)
    assert "'num_batches_tracked' in place" in gm.meta[OPAQUE_META]["1"]
    assert "momentum=None: it averages its statistics by 1 / that count" in gm.meta[OPAQUE_META]["1"]
    assert trace(model, freeze_batch_norm=True).meta[OPAQUE_META] == {}  # eval mode: nothing counted
