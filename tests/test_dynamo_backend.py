"""torch.compile(model, backend="facto"): the pass on dynamo's graphs, graph breaks included."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import facto_fx
from facto_fx.dynamo_backend import facto_backend
from facto_fx.layers import LOW_RANK_LAYERS


class Gated(nn.Module):
    """Data-dependent Python control flow: symbolic_trace fails, dynamo splits the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem(x)), 2)
        if x.mean() > 0:
            x = x * 2
        x = F.relu(self.conv2(F.relu(self.conv(x))))
        return self.fc(torch.flatten(F.max_pool2d(x, 2), 1))


def _counting_backend(calls: list, **options):
    def backend(gm, example_inputs):
        calls.append(gm)
        return facto_backend(gm, example_inputs, options)

    return backend


@pytest.fixture
def gated():
    torch._dynamo.reset()
    torch.manual_seed(0)
    return Gated(), torch.randn(2, 3, 16, 16)


def test_symbolic_trace_fails_but_the_backend_compiles(gated):
    model, x = gated
    with pytest.raises(facto_fx.FactoTraceError):
        facto_fx.compile(model)
    expected = model(x)
    calls = []
    compiled = torch.compile(model, backend=_counting_backend(calls, apply_ratio=1.0, lossy_kernel=1))
    torch.testing.assert_close(compiled(x), expected)  # M = 0: the same function
    assert len(calls) == 2  # split at the data-dependent branch


def test_gradients_reach_m_and_not_the_frozen_weight(gated):
    model, x = gated
    compiled = torch.compile(model, backend="facto", options={"apply_ratio": 1.0, "inr": 0.5})
    compiled(x).square().sum().backward()
    states = [m for m in model.modules() if isinstance(m, LOW_RANK_LAYERS)]
    assert {tuple(s.M.shape) for s in states} >= {(8, 4)}  # conv2: C_R = round(0.5 * 8)
    assert all(s.M.grad is not None and s.M.grad.abs().sum() > 0 for s in states)
    compressed = {id(s.weight) for s in states}
    for param in model.parameters():
        if id(param) in compressed:
            assert param.grad is None


def test_registered_name_and_options_reach_the_pass(gated):
    model, x = gated
    torch.compile(model, backend="facto", options={"apply_ratio": 0.0})(x)
    assert facto_fx.low_rank_parameters(model) == []  # nothing scheduled, no low-rank state


def test_merges_update_in_place_without_recompiling(gated):
    model, x = gated
    calls = []
    compiled = torch.compile(model, backend=_counting_backend(calls, apply_ratio=1.0))
    compiled(x)
    optimizer = torch.optim.SGD(facto_fx.low_rank_parameters(model), lr=0.1, momentum=0.9)
    hooks = facto_fx.attach(model, optimizer, merge_every=2)
    for _ in range(2):
        optimizer.zero_grad()
        compiled(x).square().sum().backward()
        optimizer.step()
    assert hooks.merges == 1
    assert all(torch.count_nonzero(m) == 0 for m in facto_fx.low_rank_parameters(model))
    compiled(x)
    assert len(calls) == 2  # still the two graphs of the first call: W, M, D changed in place


def test_merge_keeps_the_compiled_output(gated):
    model, x = gated
    compiled = torch.compile(model, backend="facto", options={"apply_ratio": 1.0})
    compiled(x).sum().backward()
    optimizer = torch.optim.SGD(facto_fx.low_rank_parameters(model), lr=0.1)
    hooks = facto_fx.attach(model, optimizer, merge_every=1000)
    optimizer.step()  # M != 0 now
    before = compiled(x).detach()
    hooks.merge_and_reinit()
    torch.testing.assert_close(compiled(x).detach(), before, rtol=1e-5, atol=1e-5)


def test_entry_point_finds_the_backend_without_importing_facto_fx():
    """pyproject's torch_dynamo_backends entry point: backend="facto" in a process that never imports us."""
    code = (
        "import sys, torch\n"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))\n"
        "assert 'facto_fx' not in sys.modules\n"
        "print(tuple(torch.compile(m, backend='facto', options={'apply_ratio': 1.0})(torch.randn(1, 3, 8, 8)).shape))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("(1, 4, 4, 4)")


class Plain(nn.Module):
    """Traceable by both entry points, with every kind the pass rewrites."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.scale = nn.Parameter(torch.full((1,), 0.7))
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem(x)), 2)
        x = F.relu(self.bn(self.conv(x))) * self.scale
        return self.fc(torch.flatten(F.max_pool2d(x, 2), 1))


def _plain_pair():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Plain()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model, copy.deepcopy(model)


def test_backend_and_fx_pass_give_the_same_m_gradients():
    """Same plan, same seeds, same D: after a step M != 0, and the gradients still agree."""
    options = {"apply_ratio": 1.0, "inr": 0.5, "lossy_kernel": 1, "seed": 3}
    fx_model, dynamo_model = _plain_pair()
    fmodel = facto_fx.compile(fx_model, **options)
    compiled = torch.compile(dynamo_model.eval(), backend="facto", options=options)
    fmodel.eval()
    x = torch.randn(2, 3, 16, 16)
    compiled(x)  # creates the backend's layers
    layers = {name: dynamo_model.get_submodule(name).facto for name in ("conv", "fc")}
    for name, layer in layers.items():
        assert torch.equal(layer.D, fmodel.get_submodule(name).D)
    fx_opt = torch.optim.SGD(facto_fx.low_rank_parameters(fmodel), lr=0.5)
    dynamo_opt = torch.optim.SGD(facto_fx.low_rank_parameters(dynamo_model), lr=0.5)
    for _ in range(2):
        for model, optimizer in ((fmodel, fx_opt), (compiled, dynamo_opt)):
            optimizer.zero_grad()
            model(x).square().sum().backward()
        for name, layer in layers.items():
            torch.testing.assert_close(layer.M.grad, fmodel.get_submodule(name).M.grad, rtol=1e-4, atol=1e-6)
        fx_opt.step()
        dynamo_opt.step()
    assert all(layer.M.abs().sum() > 0 for layer in layers.values())
    torch.testing.assert_close(compiled(x), fmodel(x), rtol=1e-4, atol=1e-5)


def test_a_scale_times_a_number_is_left_dense_by_both():
    """x * (self.scale * 2.0): the multiply by a number is not a scale of a feature map."""

    class Doubled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.scale = nn.Parameter(torch.full((1,), 0.5))

        def forward(self, x):
            return self.conv(x) * (self.scale * 2.0)

    torch._dynamo.reset()
    model, x = Doubled(), torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, backend="facto", options={"apply_ratio": 1.0})
    torch.testing.assert_close(compiled(x), model(x))
    decisions = {d.layer: d for d in facto_fx.decisions(facto_fx.compile(model, apply_ratio=1.0))}
    assert decisions["scale"].reason == "scale of a constant"


def test_a_shared_conv_stays_dense_in_both():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(self.conv(self.stem(x)))

    torch._dynamo.reset()
    model, x = Twice(), torch.randn(2, 3, 8, 8)
    torch.compile(model, backend="facto", options={"apply_ratio": 1.0})(x)
    assert not hasattr(model.conv, "facto")
    assert {d.layer: d for d in facto_fx.decisions(facto_fx.compile(model))}["conv"].unsupported


def test_the_backends_layers_live_in_the_model_and_survive_a_checkpoint(tmp_path):
    model, _ = _plain_pair()
    x = torch.randn(2, 3, 16, 16)
    options = {"apply_ratio": 1.0}
    compiled = torch.compile(model, backend="facto", options=options)
    compiled(x)
    keys = set(model.state_dict())
    assert {"conv.facto.M", "conv.facto.D", "conv.facto.draws"} <= keys
    assert "conv.facto.weight" not in keys  # the layer refers to conv.weight, it does not own it
    assert model.conv.weight.requires_grad  # as dynamo saw it: no recompilation
    optimizer = torch.optim.SGD(facto_fx.low_rank_parameters(model), lr=0.1)
    hooks = facto_fx.attach(model, optimizer, merge_every=1000)
    compiled(x).square().sum().backward()
    optimizer.step()
    hooks.remove()
    expected = compiled(x).detach()
    torch.save(model.state_dict(), tmp_path / "model.pt")

    torch._dynamo.reset()
    torch.manual_seed(1)
    resumed = Plain()
    compiled = torch.compile(resumed, backend="facto", options=options)
    compiled(x)  # the layers exist from the first call on
    resumed.load_state_dict(torch.load(tmp_path / "model.pt"))
    torch.testing.assert_close(compiled(x), expected)

    resumed.to(torch.float64)
    assert resumed.conv.facto.M.dtype == torch.float64
    torch.testing.assert_close(compiled(x.double()), expected.double(), rtol=1e-5, atol=1e-6)


def test_torch_max_pool2d_and_a_dense_train_mode_batch_norm():
    """torch.max_pool2d has no return_indices argument; an excluded batch-norm keeps batch statistics."""

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.max_pool2d(self.bn(self.conv(x)), 2).relu()

    torch._dynamo.reset()
    model, x = Pooled(), torch.randn(4, 3, 8, 8)
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="facto", options={"apply_ratio": 1.0, "exclude": ["bn"]})
    torch.testing.assert_close(compiled(x), reference(x))
    torch.testing.assert_close(model.bn.running_mean, reference.bn.running_mean)
    assert model.bn.num_batches_tracked == 1
    kinds = {d.layer: d for d in facto_fx.decisions(facto_fx.compile(Pooled().eval()))}
    assert kinds["max_pool2d"].rewritten


def test_methods_options_reach_every_piece_of_a_split_model(gated):
    """Names and patterns are the model's: a piece without them is not an error."""
    model, x = gated
    compiled = torch.compile(model, backend="facto", options={"apply_ratio": 1.0, "methods": {"conv*": None}})
    torch.testing.assert_close(compiled(x), model(x))
    assert not hasattr(model.conv, "facto") and not hasattr(model.conv2, "facto")
    assert hasattr(model.fc, "facto") is False  # an earlier conv is dense: the linear rule keeps it dense


def test_an_assign_load_rebinds_the_kept_layer():
    """load_state_dict(assign=True) replaces the weights; the next compilation's layer must use them."""
    model, _ = _plain_pair()
    x = torch.randn(2, 3, 16, 16)
    torch.compile(model, backend="facto", options={"apply_ratio": 1.0})(x)
    state = {k: v.clone() + (0.1 if k == "conv.weight" else 0.0) for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="facto", options={"apply_ratio": 1.0})
    compiled(x)
    assert model.conv.facto.weight is model.conv.weight
    with torch.no_grad():
        model.conv.facto.M.normal_()
    before = compiled(x).detach()
    optimizer = torch.optim.SGD(facto_fx.low_rank_parameters(model), lr=0.1)
    facto_fx.attach(model, optimizer, merge_every=1).merge_and_reinit()
    assert torch.count_nonzero(model.conv.facto.M) == 0
    torch.testing.assert_close(compiled(x).detach(), before, rtol=1e-4, atol=1e-5)


def test_no_recompilation_after_the_layers_are_added():
    model, _ = _plain_pair()
    x = torch.randn(2, 3, 16, 16)
    calls = []
    compiled = torch.compile(model, backend=_counting_backend(calls, apply_ratio=1.0))
    compiled(x)
    compiled(x)
    compiled(x).sum().backward()
    assert len(calls) == 1


def test_batch_statistics_through_the_backend():
    """batch_norm='lossy' in the backend: batch-norm trains on batch statistics; with lossy_kernel 1
    (and x̂ uncoded) the output, the running statistics and γ's gradient are those of the model run
    eagerly."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Plain()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="facto",
                             options={"apply_ratio": 1.0, "batch_norm": "lossy", "lossy_kernel": 1, "store_bits": None})
    x = torch.randn(4, 3, 16, 16)
    y, y_ref = compiled(x), reference(x)
    torch.testing.assert_close(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(model.bn.running_mean, reference.bn.running_mean)
    torch.testing.assert_close(model.bn.running_var, reference.bn.running_var)
    torch.testing.assert_close(model.bn.weight.grad, reference.bn.weight.grad, rtol=1e-4, atol=1e-5)
    assert hasattr(model.conv, "facto")  # the conv before it is Facto's

    torch._dynamo.reset()
    model = copy.deepcopy(reference)
    model.zero_grad()
    compiled = torch.compile(model, backend="facto", options={"apply_ratio": 1.0, "batch_norm": "lossy"})
    compiled(x).square().sum().backward()
    # lossy_kernel 2: γ's gradient comes from the pooled x̂ (torch's batch-norm would give the exact one)
    assert not torch.allclose(model.bn.weight.grad, reference.bn.weight.grad, rtol=1e-3)
