"""ErrorBounded through the pass: on a real torchvision model the forward is unchanged, gradients
approach dense autograd's as eb shrinks, the report counts the codes, names and state_dict stay."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import facto_fx


@pytest.fixture(scope="module")
def mobilenet():
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v3_small(num_classes=10).train()


def compiled(model, eb, **kwargs):
    return facto_fx.compile(copy.deepcopy(model), methods={"*": facto_fx.ErrorBounded(eb)}, apply_ratio=0.0,
                            binarize_activations=False, activation_bits=None, **kwargs)


def grads(model, x, seed=1):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the classifier's dropout
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_forward_exact_gradients_converge_to_dense(mobilenet):
    x = torch.randn(2, 3, 64, 64)
    dense_out, dense = grads(copy.deepcopy(mobilenet), x)
    errors = []
    for eb in (1e-2, 1e-5):
        fmodel = compiled(mobilenet, eb)
        kinds = {d.kind for d in facto_fx.decisions(fmodel) if d.rewritten}
        assert {"conv2d", "linear", "batch_norm", "activation", "mul"} <= kinds
        out, got = grads(fmodel, x)
        assert torch.equal(out, dense_out)
        assert got.keys() == dense.keys()
        # Over all parameters at once: some batch-norm biases before a train-mode batch-norm have a
        # gradient of rounding noise (1e-11), where a per-tensor relative error means nothing.
        flat_got, flat_dense = (torch.cat([g[n].flatten() for n in dense]) for g in (got, dense))
        errors.append(((flat_got - flat_dense).norm() / flat_dense.norm()).item())
    assert errors[1] < 1e-3 < errors[0]


def test_report_counts_the_codes_and_names_stay(mobilenet):
    x = torch.randn(2, 3, 64, 64)
    fmodel = compiled(mobilenet, 1e-2)
    assert fmodel.state_dict().keys() == mobilenet.state_dict().keys()
    report = facto_fx.report(fmodel, x)
    rows = [r for r in report.rows if r.decision == "eb"]
    assert rows and sum(r.facto_bytes for r in rows) < 0.5 * sum(r.vanilla_bytes for r in rows)


def test_default_plan_keeps_other_ops_and_says_why(mobilenet):
    fmodel = facto_fx.compile(copy.deepcopy(mobilenet))
    by_kind = {d.kind: d for d in facto_fx.decisions(fmodel)}
    # Hardswish, ReLU and the squeeze-excite gates' hardsigmoid: each a few-bit code, or a mask
    assert {d.label for d in facto_fx.decisions(fmodel) if d.kind == "activation"} == {"fewbit"}
    assert by_kind["mul"].rewritten and by_kind["mul"].label == "fixed"  # the store, a default
    unstored = {d.kind: d for d in facto_fx.decisions(facto_fx.compile(copy.deepcopy(mobilenet), store_bits=None))}
    assert not unstored["mul"].rewritten and unstored["mul"].unsupported and "mul" in unstored["mul"].reason


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return self.conv2(self.bn(self.conv(x)))


def test_batch_statistics_taken_only_by_a_method_that_keeps_them():
    model = _Net()
    fmodel = facto_fx.compile(copy.deepcopy(model), batch_norm="train", methods={"bn": facto_fx.ErrorBounded(1e-3)})
    (decision,) = [d for d in facto_fx.decisions(fmodel) if d.layer == "bn"]
    assert decision.rewritten
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fmodel(x), model(x))  # both with batch statistics
    torch.testing.assert_close(fmodel.get_buffer("bn.running_mean"), model.bn.running_mean)
    with pytest.raises(ValueError, match="batch_norm='train'"):
        facto_fx.compile(_Net(), batch_norm="train", methods={"bn": facto_fx.FactoLowRank()})


def test_torch_compile_runs_it_eagerly_and_the_backend_refuses():
    torch.manual_seed(0)
    model = _Net()
    x = torch.randn(2, 3, 8, 8)
    fmodel = compiled(model, 1e-4)
    torch.testing.assert_close(torch.compile(fmodel)(x), fmodel(x))
    backend = torch.compile(copy.deepcopy(model), backend=facto_fx.facto_backend,
                            options={"methods": {"*": facto_fx.ErrorBounded(1e-4)}})
    with pytest.raises(Exception, match="ErrorBounded cannot run inside a compiled graph"):
        backend(x)


@pytest.mark.parametrize("eb", [0, -1.0, float("nan"), "0.1"])
def test_bad_bound(eb):
    with pytest.raises(ValueError, match="eb"):
        facto_fx.ErrorBounded(eb)


def test_report_and_log_show_each_layers_bound_and_ratio():
    torch.manual_seed(0)
    model = _Net()
    x = torch.randn(2, 3, 8, 8)
    fmodel = facto_fx.compile(model, methods={"conv*": facto_fx.ErrorBounded(0.05, relative=True)}, apply_ratio=0.0)
    notes = facto_fx.report(fmodel, x).notes
    assert set(notes) == {"conv", "conv2"} and all("x smaller" in n and "relative=0.05" in n for n in notes.values())
    analytic = facto_fx.report(fmodel, x, analytic=True).notes
    assert all("counted uncompressed" in n for n in analytic.values())
    (line,) = facto_fx.method_summaries(fmodel)
    assert line.startswith("error-bounded: 2 layers")


def test_adaptive_bound_on_conv_layers_relative_on_the_rest():
    config = facto_fx.ErrorBounded(0.02, relative=True, adaptive=True)
    assert repr(config.bound("conv2d")).startswith("sigma=0.1")
    assert repr(config.bound("activation")) == "relative=0.02"
    with pytest.raises(ValueError, match="every"):
        facto_fx.ErrorBounded(every=0)


def test_adaptive_bounds_resume_from_their_state():
    """The bounds live in the nodes, outside state_dict: method_state carries them to a new model."""
    torch.manual_seed(0)
    config = dict(methods={"conv*": facto_fx.ErrorBounded(adaptive=True, every=3)}, apply_ratio=0.0)
    first = facto_fx.compile(_Net(), **config)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(2):
        first(x).square().mean().backward()
    state = facto_fx.method_state(first)
    assert {k.split("/")[0] for k in state} == {"conv", "conv2"}
    assert all(s["adaptive_eb"] is not None and s["calls"] >= 2 for s in state.values())
    second = facto_fx.compile(_Net(), **config)
    facto_fx.load_method_state(second, state)
    assert facto_fx.method_state(second) == state
    with pytest.raises(ValueError, match="does not have"):
        facto_fx.load_method_state(second, {"nowhere/ErrorBounded": {"calls": 1, "adaptive_eb": None}})
