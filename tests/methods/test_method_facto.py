"""Facto's batch-norm through the pass: with store_bits (the default) its pooled x̂ is kept as the
fixed-rate store's codes, counted and named by the report, its gradients close to the uncoded ones."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from model_grads import grads, relative
from torch import nn

import facto_fx
from facto_fx import FactoLowRank
from facto_fx.layers import FactoBatchNorm


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.head(h.mean((2, 3)))


class FunctionalBN(ConvBN):
    """bn2 called as F.batch_norm on the module's tensors: the pass rewrites the call."""

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        bn = self.bn2
        h = F.batch_norm(self.conv2(h), bn.running_mean, bn.running_var, bn.weight, bn.bias, self.training, 0.1,
                         bn.eps)
        return self.head(torch.relu(h).mean((2, 3)))


def test_batch_norm_codes_follow_store_bits():
    coded = facto_fx.compile(ConvBN(), apply_ratio=1.0)
    assert [m.bits for m in coded.modules() if isinstance(m, FactoBatchNorm)] == [4, 4]
    plain = facto_fx.compile(ConvBN(), apply_ratio=1.0, store_bits=None)
    assert [m.bits for m in plain.modules() if isinstance(m, FactoBatchNorm)] == [None, None]
    assert facto_fx.FactoConfig(store_bits=8).low_rank().pooled_bits == 8


def test_the_report_counts_and_names_the_codes():
    """conv1's output is kept by bn1 alone: its pooled x̂ (8×5×4 per sample for a 10×7 map) in 4 bits,
    a min and a scale (fp32) per group of 256, and 1/σ per channel (vanilla: the map, μ and 1/σ)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 7)
    fmodel = facto_fx.compile(ConvBN(), apply_ratio=1.0)
    report = facto_fx.report(fmodel, x)
    rows = {r.layer: r for r in report.rows}
    pooled = 8 * 5 * 4
    assert rows["conv1"].facto_bytes == 2 * (pooled * 4 // 8 + -(-pooled // 256) * 2 * 4) + 8 * 4
    assert rows["conv1"].vanilla_bytes == 2 * 8 * 10 * 7 * 4 + 2 * 8 * 4
    assert report.notes["bn1"] == "x̂ pooled 2×2 in 4 bits per element (fixed rate, groups of 256)"
    uncoded = facto_fx.report(facto_fx.compile(ConvBN(), apply_ratio=1.0, store_bits=None), x)
    assert uncoded.notes["bn1"] == "x̂ pooled 2×2"
    assert {r.layer: r for r in uncoded.rows}["conv1"].facto_bytes == 2 * pooled * 4 + 8 * 4


class LinearBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn, self.head = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc(x))))


def test_a_batch_norm_over_vectors_is_noted_whole():
    """A BatchNorm1d's maps have no H×W to pool: its layer pools nothing and the report says x̂ is
    kept whole (in its codes), with or without example inputs."""
    x = torch.randn(4, 6)
    for options in ({}, {"example_inputs": x}):
        fmodel = facto_fx.compile(LinearBN(), apply_ratio=1.0, **options)
        assert [m.lossy_kernel for m in fmodel.modules() if isinstance(m, FactoBatchNorm)] == [1]
        report = facto_fx.report(fmodel, x)
        assert report.notes["bn"] == "x̂ kept whole in 4 bits per element (fixed rate, groups of 256)"


@pytest.mark.parametrize("model_class", [ConvBN, FunctionalBN])
def test_coded_gradients_are_close_to_the_uncoded(model_class):
    """The same Facto model (the same D) with x̂ in 8-bit codes and uncoded: an exact forward and
    gradients within 2e-2 of each other (and not equal: the codes are used), module or call."""
    torch.manual_seed(0)
    model = model_class()
    x = torch.randn(4, 3, 12, 10)
    coded = facto_fx.compile(copy.deepcopy(model), apply_ratio=1.0, store_bits=8)
    plain = facto_fx.compile(copy.deepcopy(model), apply_ratio=1.0, store_bits=None)
    if model_class is FunctionalBN:
        report = facto_fx.report(coded, x)
        assert "in 8 bits per element" in report.notes["bn2"]
    torch.testing.assert_close(coded(x), plain(x), rtol=0, atol=0)
    error = relative(grads(coded, x), grads(plain, x))
    assert 0 < error < 2e-2


def test_pooled_bits_are_checked():
    with pytest.raises(ValueError, match=r"FactoLowRank\(pooled_bits=...\): bits must be one of"):
        FactoLowRank(pooled_bits=3)
    with pytest.raises(ValueError, match=r"FixedRate\(bits=...\)"):
        facto_fx.FactoConfig(store_bits=3)
