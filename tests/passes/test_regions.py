"""The region matcher: which nodes are local along the height, where the chain from the input
ends and why, and where a single value is live (the cuts)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn

from facto_fx.passes.regions import find_region, row_geometry


def _region(model: nn.Module):
    return find_region(fx.symbolic_trace(model))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        y = self.b(F.relu(self.a(x))) + x
        return self.head(y.mean((2, 3)))


def test_a_residual_block_is_one_chain_cut_only_where_one_value_is_live():
    region = _region(Residual())
    assert [n.name for n in region.nodes] == ["a", "relu", "b", "add"]
    assert [n.name for n in region.cuts] == ["x", "add"]  # x stays live across the branch
    assert region.stop.startswith("mean")


def test_torchvision_chains_end_at_global_pooling():
    gm = fx.symbolic_trace(torchvision.models.vgg11())
    region = find_region(gm)
    assert region.output.name == "features_20" and "AdaptiveAvgPool2d" in region.stop
    assert len(region.cuts) == len(region.nodes) + 1  # a plain chain: every node is a cut


class WithDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.drop, self.b = nn.Conv2d(3, 3, 3), nn.Dropout(0.2), nn.Conv2d(3, 3, 3)

    def forward(self, x):
        return self.b(self.drop(F.relu(self.a(x))))


def test_random_ops_and_batch_statistics_end_the_chain_with_a_reason():
    region = _region(WithDropout())
    assert [n.name for n in region.nodes] == ["a", "relu"]
    assert "random" in region.stop
    bn = _region(nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3), nn.ReLU()))
    assert [n.name for n in bn.nodes] == ["_0"] and "BatchNorm2d" in bn.stop


class SamePad(nn.Conv2d):
    """Pads in forward by the input's size, like timm's Conv2dSame: not local."""

    def forward(self, x):
        return super().forward(F.pad(x, (1, 1, 1, 1)))


class PositionalBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 3, 3, padding=1)
        self.pos = nn.Parameter(torch.zeros(1, 3, 8, 8))

    def forward(self, x):
        return F.relu(self.c(x) + self.pos)


@pytest.mark.parametrize("model,why", [
    (nn.Sequential(SamePad(3, 3, 3)), "pad is not known to be local"),
    (nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")), "padding_mode='reflect'"),
    (PositionalBias(), "rows of its own"),
])
def test_ops_that_depend_on_the_whole_map_are_not_local(model, why):
    found = _region(model)
    reason = found if isinstance(found, str) else found.stop
    assert why in reason


def test_functional_ops_have_the_module_geometry():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 3, 5, 5))

        def forward(self, x):
            x = F.conv2d(x, self.w, stride=2, padding=2, dilation=1)
            return F.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True)

    gm = fx.symbolic_trace(Functional())
    conv, pool = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert (row_geometry(gm, conv).kernel, row_geometry(gm, conv).stride, row_geometry(gm, conv).padding) == (5, 2, 2)
    assert row_geometry(gm, pool).ceil_mode and row_geometry(gm, pool).kernel == 3


def test_several_inputs_are_refused_with_a_reason():
    class Two(nn.Module):
        def forward(self, x, y):
            return F.relu(x) + y

    assert "2 inputs" in _region(Two())
