"""The guard in `compile`: a rewrite that changes what the model computes is refused, by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import facto_fx
from facto_fx import FactoVerificationError
from facto_fx.passes import match
from facto_fx.passes.trace import trace
from facto_fx.passes.verify import example_inputs, relative_error


class BatchNormThenReLU(nn.BatchNorm2d):
    """A batch-norm whose forward also applies ReLU: swapping it whole would drop the ReLU."""

    def forward(self, x):
        return F.relu(super().forward(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = BatchNormThenReLU(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.bn(self.conv1(x)))


@pytest.fixture
def swap_by_isinstance(monkeypatch):
    """Bring back the bug the guard exists for: modules matched by isinstance alone."""
    monkeypatch.setattr(match, "module_problem", lambda module, kind: None)


def test_a_wrong_rewrite_is_refused_naming_the_layer(swap_by_isinstance):
    torch.manual_seed(0)
    with pytest.raises(FactoVerificationError) as info:
        facto_fx.compile(Net(), apply_ratio=1.0, leaf_modules=["bn"])
    message = str(info.value)
    assert "first diverging node: 'bn', layer 'bn' (batch_norm" in message
    assert "exclude=['bn']" in message


def test_the_named_fix_works(swap_by_isinstance):
    torch.manual_seed(0)
    model = Net()
    fmodel = facto_fx.compile(model, apply_ratio=1.0, leaf_modules=["bn"], exclude=["bn"])
    assert type(fmodel.bn) is BatchNormThenReLU
    x = torch.randn(2, 3, 8, 8)
    model.eval(), fmodel.eval()
    torch.testing.assert_close(fmodel(x), model(x))


def test_verify_false_is_the_only_way_past_the_guard(swap_by_isinstance):
    torch.manual_seed(0)
    model = Net()
    fmodel = facto_fx.compile(model, apply_ratio=1.0, leaf_modules=["bn"], verify=False)
    x = torch.randn(2, 3, 8, 8)
    model.eval(), fmodel.eval()
    assert relative_error(fmodel(x).detach(), model(x).detach()) > 1e-2


def test_example_input_is_found_for_a_fixed_size_model_without_touching_the_global_rng():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 12 * 12, 10))
    state = torch.get_rng_state()
    facto_fx.compile(model, apply_ratio=1.0)  # only 28x28 (MNIST) fits
    assert torch.equal(torch.get_rng_state(), state)


def test_a_model_with_two_inputs_needs_example_inputs():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x, y):
            return self.conv(x) + y

    with pytest.raises(FactoVerificationError, match=r"takes 2 inputs.*example_inputs"):
        facto_fx.compile(TwoInputs())
    x = torch.randn(1, 3, 4, 4)
    facto_fx.compile(TwoInputs(), example_inputs=(x, x))


def test_a_meta_model_must_opt_out():
    with torch.device("meta"):
        model = Net()
    with pytest.raises(ValueError, match="verify=False"):
        facto_fx.compile(model)
    facto_fx.compile(model, verify=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_verified_in_the_models_own_dtype(dtype):
    torch.manual_seed(0)
    model = Net().to(dtype)
    fmodel = facto_fx.compile(model, apply_ratio=1.0)
    assert fmodel(torch.randn(2, 3, 8, 8, dtype=dtype)).dtype == dtype


def test_relative_error():
    ref = torch.tensor([1.0, -4.0, float("nan"), float("inf")])
    assert relative_error(ref.clone(), ref) == 0.0
    assert relative_error(torch.tensor([1.0, -3.0, float("nan"), float("inf")]), ref) == pytest.approx(0.25)
    assert relative_error(torch.tensor([1.0, -4.0, 0.0, float("inf")]), ref) == float("inf")
    assert relative_error(torch.tensor([1.0, -4.0, float("nan"), -float("inf")]), ref) == float("inf")
    assert relative_error(ref[:2], ref) == float("inf")


class AuxBatchNorm(nn.Module):
    """The bug above in a head run only in training: only a check in train mode can see it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.aux_bn = BatchNormThenReLU(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        x = self.conv1(x)
        y = self.conv2(x)
        return (y, self.aux_bn(x).mean()) if self.training else y


def test_a_wrong_rewrite_in_train_mode_only_is_refused(swap_by_isinstance):
    torch.manual_seed(0)
    with pytest.raises(FactoVerificationError) as info:
        facto_fx.compile(AuxBatchNorm(), apply_ratio=1.0, leaf_modules=["aux_bn"])
    message = str(info.value)
    assert "train-mode output differs" in message and "first diverging node: 'aux_bn'" in message


def test_the_example_input_runs_in_train_mode_too():
    """An auxiliary head run only in training may need a larger image than the rest (inception_v3)."""

    class BigAux(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.aux = nn.MaxPool2d(65)

        def forward(self, x):
            x = self.conv(x)
            return (x, self.aux(x)) if self.training else x

    model = BigAux()
    assert example_inputs(model, trace(model))[0].shape == (2, 3, 224, 224)  # 64 and 32 are too small


class Declared(nn.Sequential):
    """Takes one size only, and not one the guess tries; says which, as timm models do."""

    pretrained_cfg = {"input_size": (3, 40, 40)}

    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 38 * 38, 2))


def test_the_input_size_a_model_declares_is_tried_first():
    model = Declared()
    assert example_inputs(model, trace(model))[0].shape == (2, 3, 40, 40)
    facto_fx.compile(model)


def test_a_timm_model_whose_first_layer_cannot_be_read_is_verified_at_its_declared_size():
    """nf_regnet_b0's stem standardises its weight in forward: the guess would read a later layer."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("nf_regnet_b0", pretrained=False, num_classes=5)
    assert example_inputs(model, trace(model))[0].shape == (2, *model.pretrained_cfg["input_size"])
    facto_fx.compile(model)
