"""The method seam, proved from outside the package: a method registered here (conv inputs saved
in fp16) is planned, rewritten, reported, trained, stepped and exported like the built-in ones."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

import facto_fx
from facto_fx.matches import CONV, Match
from facto_fx.methods import Method, MethodConfig, RewriteSite, register_method


class _HalfInputConv(torch.autograd.Function):
    """conv2d that keeps its input in fp16 for the weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x.to(torch.float16), weight)
        ctx.conf = (x.dtype, stride, padding, bias is not None)
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad):
        x_half, weight = ctx.saved_tensors
        dtype, stride, padding, has_bias = ctx.conf
        x = x_half.to(dtype)
        grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad, stride, padding)
        grad_w = torch.nn.grad.conv2d_weight(x, weight.shape, grad, stride, padding)
        return grad_x, grad_w, grad.sum((0, 2, 3)) if has_bias else None, None, None


class HalfInputConv(nn.Module):
    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        # Not "weight": export_dense must get the dense key from dense_state, not from a shared name.
        self.kernel, self.bias = conv.weight, conv.bias
        self.stride, self.padding = conv.stride, conv.padding
        self.steps = 0

    def forward(self, x: Tensor) -> Tensor:
        return _HalfInputConv.apply(x, self.kernel, self.bias, self.stride, self.padding)


@dataclass(frozen=True)
class SavedInHalf(MethodConfig):
    label = "half"
    claimed: int | None = None  # bytes to claim in analytic reports (None: what the hooks see)

    def __post_init__(self) -> None:
        if self.claimed is not None and not (isinstance(self.claimed, int) and self.claimed >= 0):
            raise ValueError(f"claimed must be None or a byte count >= 0; got {self.claimed!r}")


@register_method(SavedInHalf)
class SavedInHalfMethod(Method):
    kinds = frozenset({CONV})
    modules = (HalfInputConv,)

    def refuses(self, match, method, context):
        conv = match.module
        if conv is None or conv.groups != 1 or conv.dilation != (1, 1) or isinstance(conv.padding, str):
            return "only plain nn.Conv2d modules"
        return None

    def rewrite(self, site: RewriteSite, match: Match, method: SavedInHalf) -> None:
        site.use_layer(match, HalfInputConv(match.module))

    def after_step(self, layers, optimizer, step, options) -> bool:
        for layer in layers:
            layer.steps = step
        return False

    def dense_state(self, layer: HalfInputConv) -> dict[str, Tensor]:
        return {"weight": layer.kernel}

    def saved_bytes(self, method: SavedInHalf, node: fx.Node, args: tuple, kwargs: dict) -> int | None:
        assert args[0].is_meta and node.op == "call_module"
        return method.claimed


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5),
    )


@pytest.fixture
def compiled():
    model = _model()
    fmodel = facto_fx.compile(model, apply_ratio=1.0, methods={"2": SavedInHalf(), "5": SavedInHalf()})
    return model, fmodel


def test_planned_by_name_and_rewritten(compiled):
    _, fmodel = compiled
    by_layer = {d.layer: d for d in facto_fx.decisions(fmodel)}
    assert by_layer["2"].method == SavedInHalf() and by_layer["2"].reason == "SavedInHalf by name"
    assert isinstance(fmodel.get_submodule("2"), HalfInputConv)
    assert isinstance(fmodel.get_submodule("5"), HalfInputConv)
    assert by_layer["8"].method is not None and by_layer["8"].method.label == "facto"  # linear: apply_ratio


def test_pattern_and_filter_choose_layers_after_names():
    model = _model()
    fmodel = facto_fx.compile(model, methods={"[25]": SavedInHalf(), lambda name, m: name == "8": None})
    by_layer = {d.layer: d for d in facto_fx.decisions(fmodel)}
    assert by_layer["2"].reason == "SavedInHalf by pattern '[25]'"
    assert by_layer["8"].method is None and by_layer["8"].excluded
    assert type(fmodel.get_submodule("8")) is nn.Linear
    assert by_layer["1"].method is not None  # a relu: the pattern's method does not take it, the default does


def test_a_name_beats_a_pattern_and_a_refusal_by_name_is_an_error():
    model = _model()
    fmodel = facto_fx.compile(model, methods={"2": None, "*": SavedInHalf()})
    by_layer = {d.layer: d for d in facto_fx.decisions(fmodel)}
    assert by_layer["2"].method is None and by_layer["5"].method == SavedInHalf()
    assert by_layer["0"].method == SavedInHalf()  # the input layer rule is Facto's, not this method's
    with pytest.raises(ValueError, match="'8'.*takes conv2d layers"):
        facto_fx.compile(model, methods={"8": SavedInHalf()})


def test_reported_from_the_hooks_or_the_estimate(compiled):
    _, fmodel = compiled
    x = torch.randn(2, 3, 16, 16)
    rows = {r.layer: r for r in facto_fx.report(fmodel, x).rows}
    assert rows["2"].decision == "half"
    assert rows["2"].facto_own_bytes == x.new_empty(2, 8, 16, 16, dtype=torch.float16).nbytes  # the fp16 input only
    claiming = facto_fx.compile(_model(), methods={"2": SavedInHalf(claimed=1234)})
    rows = {r.layer: r for r in facto_fx.report(claiming, x, analytic=True).rows}
    assert rows["2"].facto_own_bytes == 1234
    rows = {r.layer: r for r in facto_fx.report(claiming, x).rows}  # real tensors: counted, not claimed
    assert rows["2"].facto_own_bytes == x.new_empty(2, 8, 16, 16, dtype=torch.float16).nbytes


def test_trained_stepped_and_exported(compiled):
    model, fmodel = compiled
    reference = _model()  # the same initial weights, trained densely
    x, target = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    optimizer = torch.optim.SGD(fmodel.parameters(), lr=0.1)
    hooks = facto_fx.attach(fmodel, optimizer, merge_every=1000)
    F.cross_entropy(fmodel(x), target).backward()
    F.cross_entropy(reference(x), target).backward()
    grad = fmodel.get_submodule("2").kernel.grad
    torch.testing.assert_close(grad, reference[2].weight.grad, rtol=2e-2, atol=2e-3)  # fp16-saved input
    optimizer.step()
    assert hooks.steps == 1 and fmodel.get_submodule("2").steps == 1
    with torch.no_grad():
        fmodel.get_submodule("2").kernel.add_(1.0)  # export must carry the layer's current weight
    dense = facto_fx.export_dense(fmodel)
    fresh = _model()
    fresh.load_state_dict(dense.state_dict())
    torch.testing.assert_close(fresh(x), fmodel(x), rtol=1e-4, atol=1e-5)


def test_unregistered_configs_are_rejected():
    @dataclass(frozen=True)
    class Nowhere(MethodConfig):
        pass

    with pytest.raises(ValueError, match="Nowhere is not a registered method"):
        facto_fx.compile(_model(), methods={"2": Nowhere()})
    with pytest.raises(ValueError, match="must be a method config"):
        facto_fx.compile(_model(), methods={"2": "facto"})


def test_registration_is_checked():
    with pytest.raises(ValueError, match="SavedInHalf is already registered"):
        register_method(SavedInHalf)(SavedInHalfMethod)
    with pytest.raises(TypeError, match="decorates a Method subclass"):
        @dataclass(frozen=True)
        class Other(MethodConfig):
            pass

        register_method(Other)(object)
