"""Frozen batch-norm, and compile's batch_norm="detached": batch statistics in the forward (torch's
training mode, running statistics included), constants in the backward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import facto_fx
from facto_fx import RowStrips
from facto_fx.layers import FactoBatchNorm


def _net(momentum: float | None = 0.1) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=momentum), nn.ReLU(),
        nn.Conv2d(8, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6, momentum=momentum), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    )
    with torch.no_grad():  # statistics and affines away from their defaults
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net


def _detached(net: nn.Module, **options) -> torch.fx.GraphModule:
    return facto_fx.compile(copy.deepcopy(net), batch_norm="detached", apply_ratio=1.0, **options)


LAYOUTS = {
    "contiguous": lambda x: x,
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "strided": lambda x: torch.cat([x, x], dim=3)[..., ::2],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("momentum", [0.1, None])
def test_forward_and_running_statistics_are_torch_training_modes(dtype, layout, momentum):
    net = _net(momentum).to(dtype)
    fmodel = _detached(net)
    assert all(m.batch_statistics for m in fmodel.modules() if isinstance(m, FactoBatchNorm))
    net.train(), fmodel.train()
    for step, batch in enumerate((1, 3, 2)):  # batch 1 too: statistics over its 9x7 positions
        x = LAYOUTS[layout](torch.randn(batch, 3, 9, 7, dtype=dtype, generator=torch.Generator().manual_seed(step)))
        torch.testing.assert_close(fmodel(x), net(x))
    for name, tensor in net.state_dict().items():
        torch.testing.assert_close(fmodel.state_dict()[name], tensor, msg=name)
    net.eval(), fmodel.eval()  # eval: the running statistics, as torch
    x = torch.randn(2, 3, 9, 7, dtype=dtype)
    torch.testing.assert_close(fmodel(x), net(x))


def _reference_gradients(net: nn.Sequential, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dense autograd on the original layers, each batch-norm fed its batch's statistics as constants."""
    x = x.clone().requires_grad_(True)
    h = x
    for layer in net:
        if isinstance(layer, nn.BatchNorm2d):
            var, mean = torch.var_mean(h.detach(), dim=(0, 2, 3), correction=0)
            h = F.batch_norm(h, mean, var, layer.weight, layer.bias, False, 0.0, layer.eps)
        else:
            h = layer(h)
    h.square().sum().backward()
    return {"x": x.grad, **{name: p.grad for name, p in net.named_parameters() if "1." in name or "4." in name}}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradients_treat_the_batch_statistics_as_constants(layout):
    net = _net().double()
    fmodel = _detached(net, lossy_kernel=1)
    x = LAYOUTS[layout](torch.randn(3, 3, 9, 7, dtype=torch.float64))
    expected = _reference_gradients(copy.deepcopy(net), x)
    xf = x.clone().requires_grad_(True)
    fmodel.train()(xf).square().sum().backward()
    torch.testing.assert_close(xf.grad, expected["x"], rtol=1e-10, atol=1e-12)
    for name, p in fmodel.named_parameters():
        if name in expected:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)
    assert {"1.weight", "1.bias", "4.weight", "4.bias"} <= {n for n, _ in fmodel.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_and_autocast_follow_torch(dtype):
    """Statistics in fp32 whatever the activations' dtype (as torch's batch-norm keeps them)."""
    net = _net()
    fmodel = _detached(net)
    net.train(), fmodel.train()
    x = torch.randn(2, 3, 9, 7)
    with torch.autocast("cpu", dtype=dtype):
        y, expected = fmodel(x), net(x)
    assert y.dtype == expected.dtype
    torch.testing.assert_close(y.float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert fmodel.get_submodule("1").running_mean.dtype == torch.float32
    torch.testing.assert_close(fmodel.get_submodule("1").running_var, net[1].running_var, rtol=1e-2, atol=1e-3)


class FunctionalNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x)
        x = F.batch_norm(x, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias, self.training)
        return self.fc(x.mean((2, 3)))


def test_a_functional_batch_norm_is_refused_by_name():
    with pytest.raises(ValueError, match="batch_norm='detached' needs batch-norm modules; batch_norm call"):
        facto_fx.compile(FunctionalNorm(), batch_norm="detached")


def test_it_ends_a_strips_chain_and_the_backend_refuses_it():
    fmodel = _detached(_net(), row_strips=RowStrips(2))
    notes = " ".join(fmodel.meta["facto"].region_notes.values())
    assert "batch statistics (batch_norm='detached')" in notes
    backend = torch.compile(_net(), backend=facto_fx.facto_backend, options={"batch_norm": "detached"})
    with pytest.raises(Exception, match="batch_norm='detached' follows each batch-norm module's training mode"):
        backend(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="batch_norm must be 'freeze', 'detached' or 'train'"):
        facto_fx.FactoConfig(batch_norm="batch")


def test_cli_train_and_report_take_it(tmp_path, capsys):
    from facto_fx.cli import main as cli_main

    code = cli_main(["train", "--model", "cifar_vgg11_bn", "--batch-norm", "detached", "--epochs", "2",
                     "--frt-epochs", "1", "--limit-batches", "2", "--batch-size", "8", "--no-progress", "--no-plots",
                     "--out", str(tmp_path / "run")])
    assert code == 0
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert saved["config"]["batch_norm"] == "detached"
    assert cli_main(["report", "--model", "resnet18", "--batch-size", "2", "--image-size", "32",
                     "--batch-norm", "detached"]) == 0
    assert "(batch-norm frozen)" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["train", "--batch-norm", "batch"])
    assert "--batch-norm: invalid choice: 'batch'" in capsys.readouterr().err
