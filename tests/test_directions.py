"""Orthonormal D: SGD on M is SGD on Ω = W + M·D within D's row space, so at full rank (INR 1, a
linear layer: R = its inputs) it is plain SGD on the dense layer, step for step; Gaussian D is not."""

import copy

import pytest
import torch
from torch import nn

import facto_fx
from facto_fx.layers import draw_direction


def test_orthonormal_rows_with_the_papers_norm():
    d = draw_direction(6, 24, seed=3, dtype=torch.float32, device="cpu", orthonormal=True)
    alpha = (24 / 6) ** 0.25
    torch.testing.assert_close(d @ d.T, alpha**2 * torch.eye(6), atol=1e-5, rtol=0)
    assert torch.equal(d, draw_direction(6, 24, seed=3, dtype=torch.float32, device="cpu", orthonormal=True))


def _sgd_steps(model: nn.Module, steps: int, lr: float) -> nn.Module:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return model


@pytest.mark.parametrize("direction, exact", [("orthonormal", True), ("gaussian", False)])
def test_full_rank_orthonormal_facto_is_sgd(direction, exact):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    fmodel = facto_fx.compile(copy.deepcopy(dense), inr=1.0, lossy_kernel=1, apply_ratio=1.0,
                              binarize_activations=False, direction=direction)
    layers = {name: fmodel.get_submodule(name) for name in ("2", "4")}  # "0" sees the data: dense
    assert all(isinstance(layer, facto_fx.layers.FactoLinear) and layer.rank == 16 for layer in layers.values())
    _sgd_steps(dense, 5, lr=0.1)
    _sgd_steps(fmodel, 5, lr=0.1)
    same = [torch.allclose(layer.merged_weight(), dense.get_submodule(name).weight, atol=1e-5)
            for name, layer in layers.items()]
    assert same == [exact, exact]


def test_bad_direction_is_named():
    with pytest.raises(ValueError, match="direction"):
        facto_fx.FactoConfig(direction="uniform")
