"""Bytes torch.compile keeps for backward: known vanilla figures, and Facto keeps its savings."""

from __future__ import annotations

import pytest
import torch
import torchvision

import facto_fx
from facto_fx.compiled_memory import compiled_saved_bytes, compiled_saved_values

MiB = 2**20


@pytest.fixture(scope="module")
def vgg11_and_input():
    torch.manual_seed(0)
    return torchvision.models.vgg11(), torch.randn(2, 3, 224, 224)


def test_vanilla_vgg11_matches_the_reference_figures(vgg11_and_input):
    """docs/design.md §5: min-cut partitioner 37.6 MiB, activation_memory_budget 0.5 gives 13.7 MiB."""
    model, x = vgg11_and_input
    assert compiled_saved_bytes(model, x) / MiB == pytest.approx(37.6, abs=0.1)
    assert compiled_saved_bytes(model, x, activation_memory_budget=0.5) / MiB == pytest.approx(13.7, abs=0.1)


def test_parameters_are_not_counted():
    model = torch.nn.Linear(64, 3)
    x = torch.randn(5, 64)
    values = compiled_saved_values(model, x)
    assert [v.shape for v in values] == [(5, 64)]  # the input, never the weight


@pytest.mark.parametrize("batch_norm", ["freeze", "lossy"])
def test_compiled_facto_keeps_what_eager_facto_keeps(batch_norm):
    torch.manual_seed(0)
    fmodel = facto_fx.compile(torchvision.models.resnet18(num_classes=10), apply_ratio=1.0, batch_norm=batch_norm)
    x = torch.randn(2, 3, 64, 64)
    eager = facto_fx.report(fmodel, x, analytic=True)
    assert compiled_saved_bytes(fmodel, x) == eager.facto_bytes


class StoreForms(torch.nn.Module):
    """A batch-norm, a depthwise conv, a squeeze-excite product, a layer norm and a group norm: every
    form the fixed-rate store keeps, decoded in backward."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.se = nn.Conv2d(16, 16, 1)
        self.norm, self.group_norm = nn.LayerNorm(16), nn.GroupNorm(4, 16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.dw(x)
        x = x * torch.sigmoid(self.se(x.mean((2, 3), keepdim=True)))
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(self.group_norm(x).mean((2, 3)))


def test_compiled_codes_keep_what_eager_codes_keep():
    """Backward decodes with one op (facto::dequantize_map), so the partitioner keeps the packed
    codes, as eager does: traced inline, the decoder's unpacked codes were kept (13-23 % more)."""
    torch.manual_seed(0)
    fmodel = facto_fx.compile(StoreForms(), apply_ratio=1.0, store_bits=4)
    kinds = {d.layer: d.method.label for d in facto_fx.decisions(fmodel) if d.method is not None}
    assert {kinds["bn"], kinds["dw"], kinds["mul"], kinds["norm"], kinds["group_norm"]} == {"facto", "fixed"}
    x = torch.randn(2, 3, 12, 12)
    assert compiled_saved_bytes(fmodel, x) == facto_fx.report(fmodel, x, analytic=True).facto_bytes
