"""FewBitActivation through the pass: which activations the default plan codes and how many bits,
parameters carried over, exact forwards, gradients against dense autograd, the bytes kept, and
torch.compile."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import facto_fx
from facto_fx import FewBitActivation

pytestmark = pytest.mark.filterwarnings("ignore::facto_fx.FactoSavesLittleWarning")  # apply_ratio=0: one op coded

EXACT = [nn.ReLU6(), nn.Hardtanh(-2.0, 3.0), nn.LeakyReLU(0.2), nn.Hardsigmoid()]
SMOOTH = [nn.SiLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.Hardswish(), nn.Mish(), nn.ELU(0.5)]
OUTPUT_SAVING = [nn.Sigmoid(), nn.Tanh()]


def _net(act: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), act,
                         nn.Conv2d(8, 4, 3, padding=1))


def _grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, gradient of the input) for a fixed random upstream gradient."""
    x = x.clone().requires_grad_()
    y = model(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * g).sum().backward()
    return y.detach(), x.grad


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("act", EXACT, ids=lambda m: repr(m))
def test_exact_activations_keep_one_bit_and_torchs_gradient(act):
    model = _net(act)
    fmodel = facto_fx.compile(copy.deepcopy(model), apply_ratio=0.0)  # only the activation changes
    decision = {d.layer: d for d in facto_fx.decisions(fmodel)}["2"]
    assert (decision.label, decision.method, decision.reason) == ("fewbit", FewBitActivation(1),
                                                                   "derivative in 1 bit (exact)")
    x = torch.randn(2, 3, 9, 7) * 3  # reaches every branch (bounds, slopes)
    (y, grad), (y_ref, grad_ref) = _grads(fmodel, x), _grads(model, x)
    assert torch.equal(y, y_ref)
    assert torch.equal(grad, grad_ref)
    row = {r.layer: r for r in facto_fx.report(fmodel, x).rows}["2"]
    assert row.facto_own_bytes == math.ceil(2 * 8 * 9 * 7 / 8)
    assert row.vanilla_own_bytes == 2 * 8 * 9 * 7 * 4


@pytest.mark.parametrize("act", SMOOTH, ids=lambda m: repr(m))
@pytest.mark.parametrize(("bits", "bound"), [(2, 0.25), (8, 0.01)])
def test_smooth_activations_are_coded_in_the_bits_asked_for(act, bits, bound):
    """Forward exact; the input gradient within the code's error of dense autograd's (measured
    relative errors on N(0, 1) inputs: 0.06-0.18 at 2 bits, below 0.004 at 8, ops/test_fewbit.py)."""
    model = _net(act)
    fmodel = facto_fx.compile(copy.deepcopy(model), apply_ratio=0.0, activation_bits=bits)
    decision = {d.layer: d for d in facto_fx.decisions(fmodel)}["2"]
    assert decision.method == FewBitActivation(bits)
    x = torch.randn(2, 3, 9, 7)
    (y, grad), (y_ref, grad_ref) = _grads(fmodel, x), _grads(model, x)
    assert torch.equal(y, y_ref)
    assert 0 < _relative(grad, grad_ref) < bound
    row = {r.layer: r for r in facto_fx.report(fmodel, x).rows}["2"]
    assert row.facto_own_bytes == math.ceil(2 * 8 * 9 * 7 * bits / 8)


class Functional(nn.Module):
    """The functional and tensor-method forms, with parameters given positionally and by keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (nn.Conv2d(4, 4, 1) for _ in range(3))

    def forward(self, x):
        x = F.leaky_relu(self.a(x), 0.3)
        x = F.gelu(self.b(x), approximate="tanh")
        x = F.hardtanh(self.c(x), min_val=-0.5, max_val=0.5)
        return x.sigmoid() + torch.tanh(x) + F.elu(x, alpha=2.0)


def test_functional_forms_carry_their_parameters():
    model = Functional()
    fmodel = facto_fx.compile(copy.deepcopy(model), apply_ratio=0.0, activation_bits=8)
    coded = [n for n in fmodel.graph.nodes if n.target is facto_fx.ops.fewbit_activation]
    assert sorted((n.kwargs["function"], n.kwargs["bits"]) for n in coded) == [
        ("elu", 8), ("gelu", 8), ("hardtanh", 1), ("leaky_relu", 1)]  # sigmoid and tanh keep their output
    kwargs = {n.kwargs["function"]: n.kwargs for n in coded}
    assert kwargs["leaky_relu"]["negative_slope"] == 0.3 and kwargs["gelu"]["approximate"] == "tanh"
    assert (kwargs["hardtanh"]["min_val"], kwargs["hardtanh"]["max_val"]) == (-0.5, 0.5)
    assert kwargs["elu"]["alpha"] == 2.0
    x = torch.randn(2, 4, 5, 5) * 2
    (y, grad), (y_ref, grad_ref) = _grads(fmodel, x), _grads(model, x)
    assert torch.equal(y, y_ref)
    assert _relative(grad, grad_ref) < 0.01


@pytest.mark.parametrize("act", OUTPUT_SAVING, ids=lambda m: repr(m))
def test_activations_that_keep_their_output_are_coded_only_when_asked(act):
    """Vanilla sigmoid and tanh keep their output, which the layer after them keeps anyway: a code
    would add to it, so the default plan leaves them; chosen by name they are coded."""
    decision = {d.layer: d for d in facto_fx.decisions(facto_fx.compile(_net(act), apply_ratio=0.0))}["2"]
    assert decision.label == "dense" and "keeps its output" in decision.reason
    model = _net(act)
    fmodel = facto_fx.compile(copy.deepcopy(model), apply_ratio=0.0, methods={"2": FewBitActivation(8)})
    x = torch.randn(2, 3, 9, 7)
    (y, grad), (y_ref, grad_ref) = _grads(fmodel, x), _grads(model, x)
    assert torch.equal(y, y_ref) and _relative(grad, grad_ref) < 0.01


def test_options_switch_the_codes_off():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SiLU(), nn.Conv2d(4, 4, 1), nn.ReLU6(), nn.Conv2d(4, 2, 1))
    labels = {d.layer: (d.label, d.reason) for d in
              facto_fx.decisions(facto_fx.compile(model, activation_bits=None, binarize_activations=False))}
    assert labels["1"] == ("dense", "SiLU is left as it is; it keeps what it saves")
    assert labels["3"] == ("dense", "ReLU6 is left as it is; it keeps what it saves")
    labels = {d.layer: d.label for d in facto_fx.decisions(facto_fx.compile(model, activation_bits=None))}
    assert (labels["1"], labels["3"]) == ("dense", "fewbit")


def test_chosen_by_name_and_refused_where_an_in_place_op_would_change_another_reader():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.act, self.head = nn.Conv2d(3, 4, 1), nn.SiLU(inplace=True), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            h = self.conv(x)
            return self.head(self.act(h)) + h  # h is read again after the in-place SiLU wrote over it

    decision = {d.layer: d for d in facto_fx.decisions(facto_fx.compile(Shared()))}["act"]
    assert decision.label == "dense" and "in-place op whose input is also read by" in decision.reason
    with pytest.raises(ValueError, match="FewBitActivation refuses 'act'.*in-place"):
        facto_fx.compile(Shared(), methods={"act": FewBitActivation(4)})
    fmodel = facto_fx.compile(_net(nn.SiLU()), methods={"2": FewBitActivation(4)})
    assert {d.layer: d for d in facto_fx.decisions(fmodel)}["2"].method == FewBitActivation(4)


def test_bits_are_validated_naming_the_argument():
    with pytest.raises(ValueError, match=r"FewBitActivation\(bits=...\)"):
        FewBitActivation(3)
    with pytest.raises(ValueError, match="bits"):
        facto_fx.FactoConfig(activation_bits=5)


def test_the_report_names_the_form_and_its_bits():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SiLU(), nn.Conv2d(4, 4, 1), nn.ReLU6(), nn.Conv2d(4, 2, 1))
    report = facto_fx.report(facto_fx.compile(model, apply_ratio=0.0), torch.randn(2, 3, 6, 6))
    assert report.notes["1"] == "silu: f' in 2 bits per element (Lloyd-Max levels)"
    assert report.notes["3"] == "relu6: f' in 1 bit per element, exact"


@pytest.mark.parametrize(("layout", "autocast"), [("contiguous", False), ("channels_last", True)])
def test_torch_compile_fullgraph_matches_eager(layout, autocast):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.Hardswish(), nn.Conv2d(8, 4, 1))
    fmodel = facto_fx.compile(model, batch_norm="freeze", calibration_data=[torch.randn(4, 3, 8, 8)])
    x = torch.randn(2, 3, 8, 8)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(fmodel, fullgraph=True, backend="aot_eager")
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with context:
        eager, grad_eager = _grads(fmodel, x)
        traced, grad_traced = _grads(compiled, x)
    torch.testing.assert_close(traced, eager)
    torch.testing.assert_close(grad_traced, grad_eager)
