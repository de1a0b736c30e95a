"""Public verbs: export_dense round-trips into the original class; decisions; misuse is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import facto_fx
from facto_fx.layers import LOW_RANK_LAYERS
from facto_fx.models import cifar_vgg11


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _check_export(fmodel: nn.Module, fresh: nn.Module, x: torch.Tensor) -> nn.Module:
    """export_dense gives the original class, loads strictly into a fresh one and computes the same."""
    dense = facto_fx.export_dense(fmodel)
    assert type(dense) is type(fresh)
    fresh.load_state_dict(dense.state_dict(), strict=True)
    assert all(p.requires_grad for p in dense.parameters())
    for model in (fmodel, fresh, dense):
        model.eval()
    with torch.no_grad():
        expected = fmodel(x)
        assert _rel(dense(x), expected) <= 1e-5
        assert _rel(fresh(x), expected) <= 1e-5
    return dense


def test_export_dense_resnet18_after_training():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=4)
    fmodel = facto_fx.compile(model)
    optimizer = torch.optim.SGD(fmodel.parameters(), lr=0.1, momentum=0.9)
    facto_fx.attach(fmodel, optimizer, merge_every=100)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(fmodel(torch.randn(2, 3, 64, 64)), torch.tensor([0, 3])).backward()
        optimizer.step()
    layers = [m for m in fmodel.modules() if isinstance(m, LOW_RANK_LAYERS)]
    assert layers and all(torch.count_nonzero(m.M) > 0 for m in layers)
    w = fmodel.get_parameter("layer1.0.conv1.weight").detach().clone()

    dense = _check_export(fmodel, torchvision.models.resnet18(weights=None, num_classes=4), torch.randn(2, 3, 64, 64))
    assert not torch.equal(dense.layer1[0].conv1.weight, w)
    assert torch.equal(fmodel.get_parameter("layer1.0.conv1.weight"), w)  # fmodel's W is not merged by export


def test_export_dense_vgg11():
    torch.manual_seed(0)
    fmodel = facto_fx.compile(torchvision.models.vgg11(weights=None, num_classes=4))
    with torch.no_grad():
        for m in fmodel.modules():
            if isinstance(m, LOW_RANK_LAYERS):
                m.M.normal_(0, 0.01)
    _check_export(fmodel, torchvision.models.vgg11(weights=None, num_classes=4), torch.randn(2, 3, 64, 64))


def test_export_dense_after_dtype_change():
    torch.manual_seed(0)
    fmodel = facto_fx.compile(cifar_vgg11(batch_norm=True)).double()
    _check_export(fmodel, cifar_vgg11(batch_norm=True).double(), torch.randn(2, 3, 32, 32, dtype=torch.float64))


def test_decisions_list_every_layer_with_a_reason():
    fmodel = facto_fx.compile(cifar_vgg11())
    decisions = facto_fx.decisions(fmodel)
    assert [d.layer for d in decisions if d.kind == "conv2d"][:2] == ["features.0", "features.3"]
    assert all(d.reason for d in decisions)
    decisions.clear()
    assert facto_fx.decisions(fmodel), "decisions() must hand out a copy"


def test_compiling_a_facto_model_again_rejected():
    fmodel = facto_fx.compile(cifar_vgg11())
    with pytest.raises(ValueError, match="already a Facto model"):
        facto_fx.compile(fmodel)


@pytest.mark.parametrize("verb", [facto_fx.decisions, facto_fx.export_dense, facto_fx.report])
def test_verbs_need_a_compiled_model(verb):
    with pytest.raises(ValueError, match="facto_fx.compile"):
        verb(cifar_vgg11())


def test_verbs_take_a_torch_compiled_facto_model():
    fmodel = facto_fx.compile(cifar_vgg11())
    wrapped = torch.compile(fmodel)
    assert facto_fx.facto_model(wrapped) is fmodel
    assert facto_fx.decisions(wrapped) == facto_fx.decisions(fmodel)
    x = torch.randn(2, 3, 32, 32)
    assert facto_fx.report(wrapped, x).facto_bytes == facto_fx.report(fmodel, x).facto_bytes
    assert facto_fx.export_dense(wrapped).state_dict().keys() == cifar_vgg11().state_dict().keys()
    assert facto_fx.inspect(wrapped).nodes


def test_verbs_say_what_to_pass_for_a_backend_model():
    model = cifar_vgg11()
    compiled = torch.compile(model, backend=facto_fx.facto_backend)
    compiled(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="'facto' torch.compile backend.*facto_fx.compile"):
        facto_fx.report(model, torch.randn(2, 3, 32, 32))


def test_public_names_exported():
    assert set(facto_fx.__all__) >= {
        "compile", "attach", "report", "export_dense", "decisions", "saved_bytes_by_node", "FactoConfig",
        "FactoHooks", "FactoTraceError", "MemoryReport",
    }
    assert isinstance(facto_fx.compile(cifar_vgg11()), torch.fx.GraphModule)


def test_example_inputs_record_shapes():
    """compile(example_inputs=...) annotates every node with its output shape, for later passes."""
    fmodel = facto_fx.compile(cifar_vgg11(), example_inputs=(torch.randn(2, 3, 32, 32),))
    meta = {n.name: n.meta.get("tensor_meta") for n in fmodel.graph.nodes if n.op != "output"}
    assert all(m is not None for m in meta.values())
    assert tuple(meta["features_3"].shape) == (2, 128, 16, 16)
    assert tuple(meta["classifier_2"].shape) == (2, 10)


@pytest.mark.parametrize("batch_norm", ["lossy", "train"])
def test_report_leaves_the_models_statistics_alone(batch_norm):
    """report's measuring runs train on batch statistics, on copies of the buffers: the model's
    running statistics and batch counts stay as they were."""
    model = cifar_vgg11(batch_norm=True)
    fmodel = facto_fx.compile(model, batch_norm=batch_norm)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32) * 5 + 3
    report = facto_fx.report(fmodel, x, peak=True)
    assert report.facto_bytes < report.vanilla_bytes and report.facto_peak > 0
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


@pytest.mark.parametrize("batch_norm", ["freeze", "lossy", "train"])
def test_example_inputs_leave_the_models_statistics_and_mode_alone(batch_norm):
    """The shape pass must not train on the examples: batch-norm on batch statistics would fold them
    into the running statistics and count a batch."""
    model = cifar_vgg11(batch_norm=True)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    fmodel = facto_fx.compile(model, batch_norm=batch_norm, example_inputs=(torch.randn(2, 3, 32, 32) * 5 + 3,))
    assert fmodel.training and all(m.training for m in model.modules())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
