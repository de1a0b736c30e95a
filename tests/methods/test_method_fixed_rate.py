"""FixedRate through the pass: grouped / depthwise convs and squeeze-excite products kept as
fixed-rate codes (store_bits), exact forwards, gradients against dense autograd, bytes kept, export."""

from __future__ import annotations

import copy

import pytest
import torch
from model_grads import grads, relative
from torch import nn

import facto_fx
from facto_fx import FixedRate


class Block(nn.Module):
    """An inverted residual's core: expand, depthwise, squeeze-excite (a product of feature maps)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.expand = nn.Conv2d(8, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.squeeze, self.excite = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.project = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        h = self.dw(torch.relu(self.expand(self.stem(x))))
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(h.mean((2, 3), keepdim=True)))))
        return self.project(h * gate)


def test_the_store_is_a_default_and_none_leaves_them_as_they_are():
    defaults = {d.layer: d for d in facto_fx.decisions(facto_fx.compile(Block()))}
    assert defaults["dw"].method == defaults["mul"].method == FixedRate(4)
    decisions = {d.layer: d for d in facto_fx.decisions(facto_fx.compile(Block(), store_bits=None))}
    assert decisions["dw"].label == "dense" and "grouped convolution" in decisions["dw"].reason
    assert decisions["mul"].label == "dense"


@pytest.mark.parametrize(("bits", "bound"), [(8, 2e-2), (4, 0.3)])
def test_store_bits_keep_depthwise_inputs_and_products_as_codes(bits, bound):
    torch.manual_seed(0)
    model = Block()
    fmodel = facto_fx.compile(copy.deepcopy(model), apply_ratio=0.0, store_bits=bits)
    decisions = {d.layer: d for d in facto_fx.decisions(fmodel)}
    assert decisions["dw"].method == decisions["mul"].method == FixedRate(bits)
    assert f"kept in {bits} bits per element (store_bits)" in decisions["dw"].reason
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fmodel(x), model(x), rtol=0, atol=0)  # the forward is exact
    error = relative(grads(fmodel, x), grads(model, x))
    assert 0 < error < bound
    rows = {r.layer: r for r in facto_fx.report(fmodel, x).rows}
    per_sample, groups = 16 * 6 * 6 * bits // 8, 2 * -(-16 * 6 * 6 // 256)  # codes; a min and a scale per group
    assert rows["dw"].facto_own_bytes == 2 * per_sample + groups * 2 * 4
    assert rows["dw"].vanilla_own_bytes == 2 * 16 * 6 * 6 * 4


def test_gradients_are_unbiased():
    """The mean of many 2-bit gradients approaches dense autograd's (stochastic rounding)."""
    torch.manual_seed(0)
    model = Block()
    fmodel = facto_fx.compile(copy.deepcopy(model), apply_ratio=0.0, store_bits=2, activation_bits=None)
    x = torch.randn(2, 3, 6, 6)
    reference = grads(model, x)
    draws = [grads(fmodel, x) for _ in range(64)]
    mean = [torch.stack(g).mean(0) for g in zip(*draws, strict=True)]
    assert relative(mean, reference) < relative(draws[0], reference) / 4


def test_chosen_by_name_exported_dense_and_validated():
    model = Block()
    fmodel = facto_fx.compile(copy.deepcopy(model), methods={"dw": FixedRate(4), "expand": FixedRate(8)})
    assert isinstance(fmodel.get_submodule("dw"), facto_fx.layers.QuantizedConv2d)
    dense = facto_fx.export_dense(fmodel)
    assert type(dense) is Block and dense.state_dict().keys() == model.state_dict().keys()
    with pytest.raises(ValueError, match=r"FixedRate\(bits=...\)"):
        FixedRate(3)
    with pytest.raises(ValueError, match=r"FixedRate\(group=...\)"):
        FixedRate(4, group=100)
    frozen = Block()
    frozen.dw.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="FixedRate refuses 'dw'.*frozen"):
        facto_fx.compile(frozen, methods={"dw": FixedRate(4)})


class NormBlock(nn.Module):
    """A convnext block's norms in their three forms: nn.LayerNorm on NHWC, a LayerNorm2d that calls
    F.layer_norm on its own parameters, and nn.GroupNorm (one without affine parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.ln = nn.LayerNorm(8, eps=1e-6)
        self.ln2d = nn.LayerNorm(8)
        self.gn = nn.GroupNorm(4, 8)
        self.gn_plain = nn.GroupNorm(2, 8, affine=False)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.stem(x)
        h = self.ln(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        h = nn.functional.layer_norm(h.permute(0, 2, 3, 1), (8,), self.ln2d.weight, self.ln2d.bias, 1e-5)
        h = self.gn(h.permute(0, 3, 1, 2))
        return self.head(self.gn_plain(nn.functional.gelu(h)))


def test_store_bits_keep_layer_and_group_norms_x_hat():
    """Module and functional norms get the store; the forward is exact; at 8 bits every gradient is
    within 2e-2 of dense autograd's, and the report names the form."""
    torch.manual_seed(0)
    model = NormBlock()
    fmodel = facto_fx.compile(copy.deepcopy(model), apply_ratio=0.0, store_bits=8, activation_bits=None)
    decisions = {d.layer: d for d in facto_fx.decisions(fmodel)}
    norms = [d for d in decisions.values() if d.kind == "norm"]
    assert len(norms) == 4 and all(d.method == FixedRate(8) for d in norms)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fmodel(x), model(x), rtol=0, atol=0)
    assert relative(grads(fmodel, x), grads(model, x)) < 2e-2
    report = str(facto_fx.report(fmodel, x))
    assert "x̂ in 8 bits per element (fixed rate, groups of 256), 1/σ per row" in report


def test_norms_without_store_bits_keep_their_input_with_the_reason():
    decisions = [d for d in facto_fx.decisions(facto_fx.compile(NormBlock(), store_bits=None)) if d.kind == "norm"]
    assert decisions and all(d.label == "dense" and "keeps its saved input" in d.reason for d in decisions)
