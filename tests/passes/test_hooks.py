"""attach(): merge-and-reinit on schedule, optimizer-state reset, and W regularisation (paper §3.1.3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import facto_fx
from facto_fx.layers import LOW_RANK_LAYERS

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2),
}


class Small(nn.Module):
    """Three convs (two of the same shape, to compare their D) and a classifier; no dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(F.relu(self.conv3(x)), 1))


def _compile(seed: int = 0, torch_seed: int = 0) -> nn.Module:
    torch.manual_seed(torch_seed)
    return facto_fx.compile(Small(), apply_ratio=1.0, seed=seed)


def _layers(fmodel: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in fmodel.named_modules() if isinstance(m, LOW_RANK_LAYERS)}


def _train(fmodel: nn.Module, optimizer: torch.optim.Optimizer, steps: int, on_step=None) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(2, 3, 16, 16, generator=generator)
        target = torch.randint(0, 5, (2,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(fmodel(x), target).backward()
        optimizer.step()
        if on_step is not None:
            on_step()


def test_all_low_rank_layers_found():
    assert set(_layers(_compile())) == {"conv2", "conv3", "fc"}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_merge_keeps_output_resets_m_redraws_d_and_clears_m_state(name):
    fmodel = _compile()
    optimizer = OPTIMIZERS[name](fmodel.parameters())
    hooks = facto_fx.attach(fmodel, optimizer, merge_every=1000)
    _train(fmodel, optimizer, 3)
    layers = _layers(fmodel)
    assert all(layer.M.abs().sum() > 0 for layer in layers.values())
    assert all(optimizer.state[layer.M] for layer in layers.values())
    d_before = {n: layer.D.clone() for n, layer in layers.items()}

    fmodel.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        before = fmodel(x)
        hooks.merge_and_reinit()
        after = fmodel(x)
    assert ((after - before).abs().max() / before.abs().max()).item() <= 1e-5
    assert hooks.merges == 1
    for n, layer in layers.items():
        assert torch.count_nonzero(layer.M) == 0
        assert not torch.equal(layer.D, d_before[n])
        assert int(layer.draws) == 1
        assert not optimizer.state.get(layer.M)
    for kept in ("conv1.weight", "conv1.bias", "conv2.bias", "fc.bias"):
        assert optimizer.state[fmodel.get_parameter(kept)], kept


def test_training_resumes_after_a_merge():
    """Adam re-creates M's state from scratch (step 1) after the reset."""
    fmodel = _compile()
    optimizer = OPTIMIZERS["adamw"](fmodel.parameters())
    facto_fx.attach(fmodel, optimizer, merge_every=2)
    _train(fmodel, optimizer, 3)
    m = fmodel.get_submodule("conv2").M
    assert int(optimizer.state[m]["step"]) == 1
    assert torch.count_nonzero(m) > 0


def test_merges_happen_exactly_every_n_steps():
    fmodel = _compile()
    optimizer = OPTIMIZERS["sgd"](fmodel.parameters())
    hooks = facto_fx.attach(fmodel, optimizer, merge_every=3)
    history = []
    _train(fmodel, optimizer, 7, lambda: history.append((hooks.steps, hooks.merges)))
    assert history == [(s, s // 3) for s in range(1, 8)]
    assert [int(layer.draws) for layer in _layers(fmodel).values()] == [2, 2, 2]


def test_w_decay_subtracts_lambda_omega_after_each_step():
    fmodel = _compile()
    optimizer = torch.optim.SGD(fmodel.parameters(), lr=0.05)
    hooks = facto_fx.attach(fmodel, optimizer, merge_every=1000, w_decay=1e-2)
    _train(fmodel, optimizer, 1)
    layers = _layers(fmodel)
    w_before = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    _train(fmodel, optimizer, 1)
    assert hooks.steps == 2
    for n, layer in layers.items():
        omega = w_before[n] + (layer.M @ layer.D).view_as(w_before[n])
        torch.testing.assert_close(layer.weight, w_before[n] - 1e-2 * omega, rtol=1e-6, atol=1e-7)


def test_no_w_decay_leaves_w_alone():
    fmodel = _compile()
    optimizer = OPTIMIZERS["sgd"](fmodel.parameters())
    facto_fx.attach(fmodel, optimizer, merge_every=1000)
    w_before = {n: layer.weight.detach().clone() for n, layer in _layers(fmodel).items()}
    _train(fmodel, optimizer, 2)
    assert all(torch.equal(layer.weight, w_before[n]) for n, layer in _layers(fmodel).items())


def test_remove_stops_merges_and_decay():
    fmodel = _compile()
    optimizer = OPTIMIZERS["sgd"](fmodel.parameters())
    hooks = facto_fx.attach(fmodel, optimizer, merge_every=2, w_decay=1e-2)
    _train(fmodel, optimizer, 1)
    hooks.remove()
    w_before = {n: layer.weight.detach().clone() for n, layer in _layers(fmodel).items()}
    _train(fmodel, optimizer, 3)
    assert (hooks.steps, hooks.merges) == (1, 0)
    for n, layer in _layers(fmodel).items():
        assert torch.equal(layer.weight, w_before[n]) and torch.count_nonzero(layer.M) > 0
    hooks.remove()  # idempotent


def test_attach_twice_is_an_error_until_removed():
    """Two live hooks would each merge every period and decay W twice per step."""
    fmodel = _compile()
    optimizer = OPTIMIZERS["sgd"](fmodel.parameters())
    hooks = facto_fx.attach(fmodel, optimizer, merge_every=2)
    with pytest.raises(ValueError, match=r"already attached .*\.remove\(\)"):
        facto_fx.attach(fmodel, optimizer, merge_every=3)
    hooks.remove()
    again = facto_fx.attach(fmodel, optimizer, merge_every=3)
    assert again.merge_every == 3


def test_hooks_print_on_one_line():
    fmodel = _compile()
    hooks = facto_fx.attach(fmodel, OPTIMIZERS["sgd"](fmodel.parameters()), merge_every=2, w_decay=1e-3)
    text = repr(hooks)
    assert "\n" not in text and text.startswith("FactoHooks(") and "merge_every=2" in text and "w_decay=0.001" in text
    hooks.remove()
    assert repr(hooks).endswith(", removed)")


def test_attach_rejects_an_optimizer_without_m():
    fmodel = _compile()
    biases = [p for n, p in fmodel.named_parameters() if n.endswith("bias")]
    with pytest.raises(ValueError, match="not in the optimizer"):
        facto_fx.attach(fmodel, torch.optim.SGD(biases, lr=0.1), merge_every=10)


@pytest.mark.parametrize(("merge_every", "w_decay"), [(0, 0.0), (-1, 0.0), (True, 0.0), (2.5, 0.0), (10, -0.1)])
def test_attach_rejects_bad_schedule(merge_every, w_decay):
    fmodel = _compile()
    optimizer = OPTIMIZERS["sgd"](fmodel.parameters())
    with pytest.raises(ValueError, match="merge_every" if w_decay == 0 else "w_decay"):
        facto_fx.attach(fmodel, optimizer, merge_every=merge_every, w_decay=w_decay)


def test_attach_rejects_a_model_without_low_rank_layers():
    model = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="no Facto"):
        facto_fx.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), merge_every=1)


def _directions(fmodel: nn.Module) -> dict[str, torch.Tensor]:
    return {n: layer.D.clone() for n, layer in _layers(fmodel).items()}


def test_d_draws_are_deterministic_per_seed():
    """Same seed: same D, also after a redraw, whatever the torch RNG state; distinct layers differ."""
    a, b = _compile(seed=0), _compile(seed=0, torch_seed=5)
    da, db = _directions(a), _directions(b)
    assert all(torch.equal(da[n], db[n]) for n in da)
    assert not torch.equal(da["conv2"], da["conv3"])  # same shape, distinct layers

    for fmodel in (a, b):
        facto_fx.attach(fmodel, OPTIMIZERS["sgd"](fmodel.parameters()), merge_every=1).merge_and_reinit()
    ra, rb = _directions(a), _directions(b)
    assert all(torch.equal(ra[n], rb[n]) and not torch.equal(ra[n], da[n]) for n in ra)


def test_different_seed_draws_different_d():
    da, dc = _directions(_compile(seed=0)), _directions(_compile(seed=1))
    assert not any(torch.equal(da[n], dc[n]) for n in da)


@pytest.mark.parametrize("scale, power", [("unbiased", 0.5), ("paper", 0.25)])
def test_d_rows_scaled_unbiased_or_as_paper_eq_13(scale, power):
    """Each row has norm α = (I/R)^(1/2), or (I/R)^(1/4) as the paper's, with I = C_I·k_h·k_w."""
    torch.manual_seed(0)
    conv2 = facto_fx.compile(Small(), apply_ratio=1.0, scale=scale).get_submodule("conv2")
    features, rank = conv2.D.shape[1], conv2.D.shape[0]
    assert (features, rank) == (8 * 9, round(0.3 * 8))
    norms = conv2.D.norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, (features / rank) ** power))
