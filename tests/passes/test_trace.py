"""Tracing errors must point at the untraceable sub-module and say how to work around it."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import facto_fx


class Gate(nn.Module):
    """Data-dependent control flow: symbolic tracing cannot follow the branch."""

    def forward(self, x):
        if x.sum() > 0:  # the line the error must point at
            return x
        return -x


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = Gate()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv3(torch.relu(self.conv2(self.gate(self.conv1(x)))))


def _gate_line() -> str:
    """file:line of the `if` in Gate.forward."""
    lines, first = inspect.getsourcelines(Gate.forward)
    offset = next(i for i, text in enumerate(lines) if "x.sum() > 0" in text)
    return f"{inspect.getsourcefile(Gate)}:{first + offset}"


def _trace_error() -> str:
    with pytest.raises(facto_fx.FactoTraceError) as info:
        facto_fx.compile(Gated())
    return str(info.value)


def test_trace_error_points_at_source_line_and_suggests_leaf_modules():
    message = _trace_error()
    assert _gate_line() in message
    assert "leaf_modules" in message


def test_trace_error_names_the_failing_submodule():
    message = _trace_error()
    assert "'gate'" in message
    assert "leaf_modules=['gate']" in message


def test_leaf_module_makes_it_traceable_with_the_same_output():
    torch.manual_seed(0)
    model = Gated()
    fmodel = facto_fx.compile(model, leaf_modules=["gate"], apply_ratio=1.0)
    assert any(n.op == "call_module" and n.target == "gate" for n in fmodel.graph.nodes)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    expected = model(x)
    torch.testing.assert_close(fmodel(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fmodel(-x), model(-x), rtol=1e-5, atol=1e-6)


def test_unknown_leaf_module_rejected():
    with pytest.raises(ValueError, match="gat"):
        facto_fx.compile(Gated(), leaf_modules=["gat"])
