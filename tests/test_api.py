"""Public verbs: export_dense round-trips into the original class; decisions; misuse is refused."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import GoogLeNetOutputs, InceptionOutputs

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


def _small() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16))


def test_a_single_tensor_is_taken_as_the_example_input():
    fmodel = facto_fx.compile(_small(), example_inputs=torch.randn(2, 3, 16, 16), batch_norm="lossy")
    assert tuple(next(n for n in fmodel.graph.nodes if n.name == "_0").meta["tensor_meta"].shape) == (2, 8, 14, 14)


def test_a_config_that_is_not_a_factoconfig_says_to_pass_keywords():
    with pytest.raises(TypeError, match=r"config must be a FactoConfig, got float.*compile\(model, inr=0.3\)"):
        facto_fx.compile(_small(), 0.3)


def test_an_unbatched_input_is_named_with_its_fix():
    x = torch.randn(3, 16, 16)
    fix = r"shape \(3, 16, 16\) looks unbatched \(C, H, W\): layer '0' \(Conv2d\).*x.unsqueeze\(0\)"
    with pytest.raises(ValueError, match=f"example_inputs of {fix}"):
        facto_fx.compile(_small(), example_inputs=(x,), batch_norm="lossy")
    with pytest.raises(ValueError, match=f"input of {fix}"):
        facto_fx.report(facto_fx.compile(_small(), batch_norm="lossy"), x)


def test_a_wrong_channel_count_names_the_layer_and_the_shape_it_expects():
    fmodel = facto_fx.compile(_small(), batch_norm="lossy")
    x = torch.randn(2, 4, 16, 16)
    expected = r"layer '0' \(Conv2d\) expects 3 input channels; got input of shape \(2, 4, 16, 16\)"
    with pytest.raises(ValueError, match=expected):
        facto_fx.report(fmodel, x)
    with pytest.raises(ValueError, match=expected.replace("got input", "got example_inputs")):
        facto_fx.compile(_small(), example_inputs=(x,))
    linear = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"layer '0' \(Linear\) expects 16 input features; got input of shape \(2, 15"):
        facto_fx.report(facto_fx.compile(linear), torch.randn(2, 15))


class _Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 32)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


@pytest.mark.parametrize(("model", "layer"), [(_Transformer, "encoder"), (_Recurrent, "lstm")])
def test_a_model_the_pass_cannot_compress_is_warned_about(model, layer):
    torch.manual_seed(0)
    kept = type(getattr(model(), layer)).__name__
    expected = rf"saves \d+\.\d % of vanilla's bytes.*'{layer}' \(opaque, \d+ %\): {kept} is a torch.nn module"
    with pytest.warns(facto_fx.FactoSavesLittleWarning, match=expected):
        facto_fx.compile(model(), example_inputs=torch.randn(2, 8, 16))


@pytest.mark.parametrize("model", [
    lambda: cifar_vgg11(batch_norm=True), lambda: torchvision.models.resnet18(num_classes=10),
])
def test_a_model_the_pass_compresses_is_not_warned_about(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error", facto_fx.FactoSavesLittleWarning)
        facto_fx.compile(model(), batch_norm="lossy", example_inputs=torch.randn(2, 3, 32, 32))


def test_without_an_input_there_is_nothing_to_measure():
    with warnings.catch_warnings():
        warnings.simplefilter("error", facto_fx.FactoSavesLittleWarning)
        facto_fx.compile(_Recurrent(), verify=False)


def test_the_check_measures_models_that_cannot_run_on_meta_tensors_for_real():
    """An opaque module with a data-dependent branch cannot run on meta tensors: the check then
    runs the example input itself, leaving the global random state as it was."""

    class Gate(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    model = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5), Gate(), nn.LSTM(16, 16, batch_first=True))
    x = torch.randn(2, 8, 16)
    state = torch.get_rng_state()
    with pytest.warns(facto_fx.FactoSavesLittleWarning, match="'3' \\(opaque"):
        facto_fx.compile(model, example_inputs=x)
    assert torch.equal(torch.get_rng_state(), state)


def _googlenet(dtype: torch.dtype = torch.float32) -> nn.Module:
    """torchvision's googlenet with its auxiliary heads (run in training only), dropout off."""
    torch.manual_seed(0)
    return torchvision.models.googlenet(
        num_classes=5, aux_logits=True, init_weights=False, dropout=0.0, dropout_aux=0.0
    ).to(dtype)


def _frozen_statistics(model: nn.Module) -> nn.Module:
    """`model` in train mode with its batch-norms in eval: what batch_norm="freeze" trains."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model


def _assert_same_gradients(fmodel, out, reference, expected, rtol, atol):
    """Backward of the squared outputs (a namedtuple of logits and aux logits) through both models:
    every parameter's gradient equals the original's."""
    sum(o.square().sum() for o in out).backward()
    sum(o.square().sum() for o in expected).backward()
    grads = {name: p.grad for name, p in fmodel.named_parameters()}
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=rtol, atol=atol, msg=name)


def test_googlenet_with_aux_logits_trains_like_the_original_with_every_layer_dense():
    """apply_ratio=0 leaves every layer dense (maps saved losslessly): train mode returns the
    original's namedtuple, auxiliary logits included, with the original's gradients; eval a tensor."""
    model = _googlenet(torch.float64)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    fmodel = facto_fx.compile(model, apply_ratio=0.0, batch_norm="train", example_inputs=(x,))
    out, expected = fmodel(x), reference(x)
    assert type(out) is type(expected) is GoogLeNetOutputs
    torch.testing.assert_close(tuple(out), tuple(expected), rtol=1e-10, atol=1e-12)
    _assert_same_gradients(fmodel, out, reference, expected, rtol=1e-10, atol=1e-12)
    fmodel.eval(), reference.eval()
    torch.testing.assert_close(fmodel(x), reference(x), rtol=1e-10, atol=1e-12)  # statistics updated alike


def test_googlenet_facto_layers_serve_both_modes():
    """Each layer is rewritten once: the aux heads' layers train with M, the main path's Facto
    layers run in both modes, and report / export_dense see one model."""
    model = _googlenet()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    fmodel = facto_fx.compile(model, apply_ratio=1.0, lossy_kernel=1, example_inputs=(x,), batch_norm="freeze")
    layers = {name: m for name, m in fmodel.named_modules() if isinstance(m, LOW_RANK_LAYERS)}
    assert "aux1.fc2" in layers and "inception4a.branch1.conv" in layers
    assert len({d.layer for d in facto_fx.decisions(fmodel)}) == len(facto_fx.decisions(fmodel))
    calls = []
    layers["inception4a.branch1.conv"].register_forward_hook(lambda *_: calls.append(1))
    out, expected = fmodel(x), _frozen_statistics(reference)(x)
    assert type(out) is GoogLeNetOutputs and calls == [1]
    torch.testing.assert_close(tuple(out), tuple(expected), rtol=1e-4, atol=1e-5)  # M = 0
    sum(o.square().sum() for o in out).backward()
    assert all(torch.isfinite(m.M.grad).all() for m in layers.values())
    fmodel.eval(), reference.eval()
    with torch.no_grad():
        assert isinstance(fmodel(x), torch.Tensor) and calls == [1, 1]
        torch.testing.assert_close(fmodel(x), reference(x), rtol=1e-4, atol=1e-5)
    assert any(row.layer.startswith("aux2.") for row in facto_fx.report(fmodel, x, analytic=True).rows)
    _check_export(fmodel, torchvision.models.googlenet(num_classes=5, aux_logits=True, init_weights=False), x)


def test_inception_v3_on_an_image_its_aux_head_cannot_take_is_refused_naming_train_mode():
    """75² is inception_v3's smallest input in eval; its auxiliary head, run in training, needs 299²."""
    torch.manual_seed(0)
    model = torchvision.models.inception_v3(num_classes=5, aux_logits=True, init_weights=False)
    with pytest.raises(facto_fx.FactoVerificationError, match=r"Inception3 itself fails in train mode.*2, 3, 75, 75"):
        facto_fx.compile(model, example_inputs=(torch.randn(2, 3, 75, 75),))


def test_inception_v3_with_aux_logits_trains_like_the_original():
    torch.manual_seed(0)
    model = torchvision.models.inception_v3(
        num_classes=5, aux_logits=True, init_weights=False, dropout=0.0, transform_input=True
    )
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 299, 299)
    fmodel = facto_fx.compile(model, apply_ratio=0.0, batch_norm="train", example_inputs=(x,))
    out, expected = fmodel(x), reference(x)
    assert type(out) is type(expected) is InceptionOutputs
    torch.testing.assert_close(tuple(out), tuple(expected))
    _assert_same_gradients(fmodel, out, reference, expected, rtol=1e-4, atol=1e-6)
    fmodel.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(fmodel(x), reference(x))
    _check_export(fmodel, torchvision.models.inception_v3(num_classes=5, aux_logits=True, init_weights=False), x)
