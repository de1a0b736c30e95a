"""Orthonormal D: SGD on M is SGD on Ω = W + M·D within D's row space, so at full rank (INR 1, a
linear layer: R = its inputs) it is plain SGD on the dense layer, step for step; Gaussian D is not."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import facto_fx
from facto_fx.layers import draw_direction, gradient_direction


def test_orthonormal_rows_with_the_papers_norm():
    d = draw_direction(6, 24, seed=3, dtype=torch.float32, device="cpu", orthonormal=True, scale="paper")
    alpha = (24 / 6) ** 0.25
    torch.testing.assert_close(d @ d.T, alpha**2 * torch.eye(6), atol=1e-5, rtol=0)
    assert torch.equal(d, draw_direction(6, 24, seed=3, dtype=torch.float32, device="cpu", orthonormal=True,
                                         scale="paper"))


@pytest.mark.parametrize("orthonormal", [False, True])
def test_unbiased_directions_make_the_expected_step_the_full_rank_step(orthonormal):
    """E[DᵀD] = I: averaged over many draws, SGD on M moves Ω as SGD on Ω would; the paper's norm
    gives sqrt(R/I)·I."""
    draws = [draw_direction(3, 12, seed=s, dtype=torch.float64, device="cpu", orthonormal=orthonormal)
             for s in range(4000)]
    mean = torch.stack([d.T @ d for d in draws]).mean(0)
    torch.testing.assert_close(mean, torch.eye(12, dtype=torch.float64), atol=0.08, rtol=0)
    paper = torch.stack([d.T @ d for d in (draw_direction(3, 12, seed=s, dtype=torch.float64, device="cpu",
                                                          orthonormal=orthonormal, scale="paper")
                                           for s in range(4000))]).mean(0)
    torch.testing.assert_close(paper, (3 / 12) ** 0.5 * torch.eye(12, dtype=torch.float64), atol=0.05, rtol=0)


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


# -- directions from the weight gradient (GaLore-style) --------------------------------------


@pytest.mark.parametrize("out, rank", [(12, 5), (3, 5)])  # more outputs than the rank, and fewer
def test_gradient_direction_keeps_the_gradients_top_singular_energy(out, rank):
    g = torch.randn(out, 20, generator=torch.Generator().manual_seed(out), dtype=torch.float64)
    d = gradient_direction(g, rank, seed=7)
    assert d.shape == (rank, 20)
    torch.testing.assert_close(d @ d.T, torch.eye(rank, dtype=d.dtype), atol=1e-10, rtol=0)
    sigma = torch.linalg.svdvals(g)  # independent: what the best rank-`rank` subspace keeps
    kept = (g @ d.T).square().sum()
    torch.testing.assert_close(kept, sigma[:rank].square().sum(), rtol=1e-10, atol=0)
    assert torch.equal(d, gradient_direction(g, rank, seed=7))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=2, dilation=2, stride=2)
        self.bn = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12 * 4 * 4, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv2(F.relu(self.conv1(x)))))
        return self.fc(F.adaptive_avg_pool2d(x, 4).flatten(1))


def _probe_batch(channels_last: bool = False):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 3, 15, 13, generator=g), torch.randint(0, 5, (4,), generator=g)
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batch_norm", ["freeze", "lossy"])
def test_attach_takes_d_from_the_dense_gradient_and_leaves_the_model_as_it_was(channels_last, batch_norm):
    torch.manual_seed(0)
    dense = ConvNet()
    with torch.no_grad():
        dense.bn.running_mean.uniform_(-0.5, 0.5)
        dense.bn.running_var.uniform_(0.5, 2.0)
    fmodel = facto_fx.compile(copy.deepcopy(dense), inr=0.5, apply_ratio=1.0, direction="gradient",
                              batch_norm=batch_norm)
    fmodel.train()
    x, y = _probe_batch(channels_last)
    # the reference: torch's own autograd of the dense model, in eval mode as the probe runs
    reference = copy.deepcopy(dense).eval()
    F.cross_entropy(reference(x), y).backward()
    buffers = {k: v.clone() for k, v in fmodel.state_dict().items() if "running" in k or "tracked" in k}
    optimizer = torch.optim.SGD(fmodel.parameters(), lr=0.1)
    facto_fx.attach(fmodel, optimizer, merge_every=3, probe=lambda: F.cross_entropy(fmodel(x), y))
    for name in ("conv2", "fc"):  # conv2: rank 4 of 12 outputs; fc: rank 96 beyond its 5 outputs
        layer, g = fmodel.get_submodule(name), reference.get_submodule(name).weight.grad.flatten(1).double()
        d = layer.D.double()
        torch.testing.assert_close(d @ d.T, torch.eye(layer.rank, dtype=d.dtype), atol=1e-6, rtol=0)
        best = torch.linalg.svdvals(g)[: layer.rank].square().sum()  # what the best subspace keeps
        torch.testing.assert_close((g @ d.T).square().sum(), best, rtol=1e-4, atol=0)
    assert fmodel.training and all(m.training for m in fmodel.modules())
    assert all(torch.equal(v, fmodel.state_dict()[k]) for k, v in buffers.items())  # no statistics moved
    assert all(p.grad is None for p in fmodel.parameters())


def test_a_merge_keeps_the_output_and_takes_fresh_directions():
    torch.manual_seed(0)
    fmodel = facto_fx.compile(ConvNet(), inr=0.5, apply_ratio=1.0, direction="gradient")
    x, y = _probe_batch()
    optimizer = torch.optim.SGD(fmodel.parameters(), lr=0.1)
    outputs = []

    def record(*_):  # registered first, so it runs after each step and before the merge
        with torch.no_grad():
            outputs.append(fmodel.eval()(x))
        fmodel.train()

    optimizer.register_step_post_hook(record)
    hooks = facto_fx.attach(fmodel, optimizer, merge_every=2, probe=lambda: F.cross_entropy(fmodel(x), y))
    layer = fmodel.get_submodule("conv2")
    before = layer.D.clone()
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(fmodel(x), y).backward()
        optimizer.step()
    assert hooks.merges == 1 and not torch.equal(before, layer.D) and layer.M.abs().sum() == 0
    with torch.no_grad():  # the merge moved M·D into W: the function is the one the step left
        torch.testing.assert_close(fmodel.eval()(x), outputs[-1], atol=1e-5, rtol=1e-5)


def test_gradient_directions_need_a_probe_and_say_so():
    fmodel = facto_fx.compile(ConvNet(), apply_ratio=1.0, direction="gradient")
    optimizer = torch.optim.SGD(fmodel.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"direction='gradient'.*attach\(\.\.\., probe="):
        facto_fx.attach(fmodel, optimizer, merge_every=2)


def test_a_probe_under_bf16_autocast_finds_the_fp32_gradients_subspace():
    torch.manual_seed(0)
    dense = ConvNet().eval()
    fmodel = facto_fx.compile(copy.deepcopy(dense), inr=0.5, apply_ratio=1.0, direction="gradient")
    x, y = _probe_batch()
    F.cross_entropy(dense(x), y).backward()

    def probe():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.cross_entropy(fmodel(x), y)

    facto_fx.attach(fmodel, torch.optim.SGD(fmodel.parameters(), lr=0.1), merge_every=2, probe=probe)
    layer, g = fmodel.get_submodule("conv2"), dense.conv2.weight.grad.flatten(1).double()
    assert layer.D.dtype == torch.float32 and torch.isfinite(layer.D).all()
    best = torch.linalg.svdvals(g)[: layer.rank].square().sum()
    assert (g @ layer.D.double().T).square().sum() > 0.97 * best


def test_a_layer_output_changed_in_place_is_an_error_not_a_wrong_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(100, 2))
    x, y = torch.randn(2, 3, 9, 9), torch.tensor([0, 1])
    fmodel = facto_fx.compile(model, apply_ratio=1.0, direction="gradient", binarize_activations=False,
                              example_inputs=x)
    with pytest.raises(RuntimeError, match=r"modified in place.*inplace ReLU"):
        facto_fx.attach(fmodel, torch.optim.SGD(fmodel.parameters(), lr=0.1), merge_every=2,
                        probe=lambda: F.cross_entropy(fmodel(x), y))
