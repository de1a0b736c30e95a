"""torch.compile(model, backend="facto"): the pass on dynamo's graphs, graph breaks included."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import facto_fx
from facto_fx.dynamo_backend import facto_backend


class Gated(nn.Module):
    """Data-dependent Python control flow: symbolic_trace fails, dynamo splits the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem(x)), 2)
        if x.mean() > 0:
            x = x * 2
        x = F.relu(self.conv2(F.relu(self.conv(x))))
        return self.fc(torch.flatten(F.max_pool2d(x, 2), 1))


def _counting_backend(calls: list, **options):
    def backend(gm, example_inputs):
        calls.append(gm)
        return facto_backend(gm, example_inputs, options)

    return backend


@pytest.fixture
def gated():
    torch._dynamo.reset()
    torch.manual_seed(0)
    return Gated(), torch.randn(2, 3, 16, 16)


def test_symbolic_trace_fails_but_the_backend_compiles(gated):
    model, x = gated
    with pytest.raises(facto_fx.FactoTraceError):
        facto_fx.compile(model)
    expected = model(x)
    calls = []
    compiled = torch.compile(model, backend=_counting_backend(calls, apply_ratio=1.0, lossy_kernel=1))
    torch.testing.assert_close(compiled(x), expected)  # M = 0: the same function
    assert len(calls) == 2  # split at the data-dependent branch


def test_gradients_reach_m_and_not_the_frozen_weight(gated):
    model, x = gated
    compiled = torch.compile(model, backend="facto", options={"apply_ratio": 1.0, "inr": 0.5})
    compiled(x).square().sum().backward()
    states = facto_fx.dynamo_backend.low_rank_states(model)
    assert {tuple(s.M.shape) for s in states} >= {(8, 4)}  # conv2: C_R = round(0.5 * 8)
    assert all(s.M.grad is not None and s.M.grad.abs().sum() > 0 for s in states)
    compressed = {id(s.weight) for s in states}
    for param in model.parameters():
        if id(param) in compressed:
            assert param.grad is None


def test_registered_name_and_options_reach_the_pass(gated):
    model, x = gated
    torch.compile(model, backend="facto", options={"apply_ratio": 0.0})(x)
    assert facto_fx.low_rank_parameters(model) == []  # nothing scheduled, no low-rank state


def test_merges_update_in_place_without_recompiling(gated):
    model, x = gated
    calls = []
    compiled = torch.compile(model, backend=_counting_backend(calls, apply_ratio=1.0))
    compiled(x)
    optimizer = torch.optim.SGD(facto_fx.low_rank_parameters(model), lr=0.1, momentum=0.9)
    hooks = facto_fx.attach(model, optimizer, merge_every=2)
    for _ in range(2):
        optimizer.zero_grad()
        compiled(x).square().sum().backward()
        optimizer.step()
    assert hooks.merges == 1
    assert all(torch.count_nonzero(m) == 0 for m in facto_fx.low_rank_parameters(model))
    compiled(x)
    assert len(calls) == 2  # still the two graphs of the first call: W, M, D changed in place


def test_merge_keeps_the_compiled_output(gated):
    model, x = gated
    compiled = torch.compile(model, backend="facto", options={"apply_ratio": 1.0})
    compiled(x).sum().backward()
    optimizer = torch.optim.SGD(facto_fx.low_rank_parameters(model), lr=0.1)
    hooks = facto_fx.attach(model, optimizer, merge_every=1000)
    optimizer.step()  # M != 0 now
    before = compiled(x).detach()
    hooks.merge_and_reinit()
    torch.testing.assert_close(compiled(x).detach(), before, rtol=1e-5, atol=1e-5)


def test_entry_point_finds_the_backend_without_importing_facto_fx():
    """pyproject's torch_dynamo_backends entry point: backend="facto" in a process that never imports us."""
    code = (
        "import sys, torch\n"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))\n"
        "assert 'facto_fx' not in sys.modules\n"
        "print(tuple(torch.compile(m, backend='facto', options={'apply_ratio': 1.0})(torch.randn(1, 3, 8, 8)).shape))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("(1, 4, 4, 4)")
