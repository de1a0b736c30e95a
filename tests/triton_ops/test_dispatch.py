"""Kernel dispatch: which implementation each facto op runs under kernels="auto" / "triton" / "torch",
that both give the same results, and that "triton" fails clearly where it cannot run."""

import pytest
import torch
import torch._dynamo
from torch import nn

import facto_fx
import facto_fx.ops as facto
from facto_fx.triton_ops import dispatch
from facto_fx.triton_ops import relu as triton_relu


class TinyNet(nn.Module):
    """Every op with a Triton kernel: conv (grad_M), batch-norm, relu, max-pool, scale, dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(3, 2, padding=1)
        self.scale = nn.Parameter(torch.tensor([1.5]))
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        x = self.pool(torch.relu(self.stem(x)))
        x = torch.relu(self.bn(self.conv(x))) * self.scale
        return self.fc(self.drop(torch.flatten(x, 1)))


def _fmodel(kernels):
    """Batch-norm's x̂ uncoded (store_bits=None): the two paths' codes draw different noise
    (tests/triton_ops/test_triton_quantized.py compares them by their statistics)."""
    torch.manual_seed(0)
    fmodel = facto_fx.compile(TinyNet(), apply_ratio=1.0, kernels=kernels, example_inputs=(torch.randn(1, 3, 6, 6),),
                              store_bits=None)
    with torch.no_grad():
        for layer in fmodel.modules():
            if hasattr(layer, "M"):
                layer.M.normal_(std=0.1)
    return fmodel


def _step(model, x):
    torch.manual_seed(1)  # the same dropout draws in every run
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of the Triton relu launchers (forward and backward)."""
    calls = []
    for name in ("relu_forward", "relu_backward"):
        original = getattr(triton_relu, name)
        monkeypatch.setattr(triton_relu, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    return calls


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=str)
def test_triton_model_matches_torch_model(memory_format):
    """compile(kernels="triton") runs every kernel (interpreted on CPU) and gives torch's numbers,
    on NCHW and on channels_last maps."""
    x = torch.randn(1, 3, 6, 6).contiguous(memory_format=memory_format)
    out_torch, grads_torch = _step(_fmodel("torch"), x)
    out_triton, grads_triton = _step(_fmodel("triton"), x)
    torch.testing.assert_close(out_triton, out_torch)
    assert grads_triton.keys() == grads_torch.keys()
    for name, grad in grads_torch.items():
        torch.testing.assert_close(grads_triton[name], grad, msg=name)
    assert dispatch.current_mode() == "auto"


@pytest.mark.parametrize(("kernels", "expected"), [("auto", []), ("torch", []), ("triton", ["relu_forward"])])
def test_model_setting_picks_the_path(kernels, expected, spy):
    """On CPU, "auto" and "torch" never launch a kernel; "triton" does (once per relu call)."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    fmodel = facto_fx.compile(model, apply_ratio=1.0, kernels=kernels)
    spy.clear()  # compile's verification ran the model once
    fmodel(torch.randn(1, 1, 4, 4, requires_grad=True))
    assert spy == expected


VIEWS = {
    "contiguous": lambda t: t,
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "strided": lambda t: t[..., ::2],
    "transposed": lambda t: t.transpose(-1, -2),
}


@pytest.mark.parametrize(
    ("view", "dtype", "expected"),
    [("contiguous", torch.float32, True), ("channels_last", torch.bfloat16, True), ("strided", torch.float32, False),
     ("transposed", torch.float32, False), ("channels_last", torch.float64, False)],
)
def test_auto_runs_kernels_on_cuda_maps_in_either_layout(view, dtype, expected, monkeypatch):
    """Under "auto", CUDA maps go to the kernels when contiguous or channels_last (which they index
    in memory order); other strides and dtypes take the PyTorch path."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # CUDA, as far as "auto" can tell
    x = VIEWS[view](torch.randn(2, 3, 4, 6, dtype=dtype))
    assert dispatch.use_triton(x, "auto") is expected


def test_backward_uses_the_forward_choice(spy):
    """The mode is captured with the autograd context: backward outside the block still uses Triton."""
    x = torch.randn(9, requires_grad=True)
    with facto_fx.use_kernels("triton"):
        y = facto.relu(x)
    y.sum().backward()
    assert spy == ["relu_forward", "relu_backward"]
    assert torch.equal(x.grad, (x > 0).float())


def test_mode_restored_when_forward_raises():
    fmodel = _fmodel("torch")
    with pytest.raises(RuntimeError):
        fmodel(torch.randn(1, 5, 6, 6))  # wrong channel count
    assert dispatch.current_mode() == "auto"


def test_triton_without_interpreter_on_cpu_says_what_to_do(monkeypatch):
    monkeypatch.setattr(dispatch, "interpreter_enabled", lambda: False)
    with pytest.raises(RuntimeError, match=r"needs CUDA tensors.*kernels='auto' or 'torch'"):
        _fmodel("triton")(torch.randn(1, 3, 6, 6))
    _fmodel("auto")(torch.randn(1, 3, 6, 6))  # the default still runs


def test_triton_not_importable(monkeypatch, spy):
    monkeypatch.setattr(dispatch, "triton_importable", lambda: False)
    x = torch.randn(5, requires_grad=True)
    with facto_fx.use_kernels("triton"), pytest.raises(RuntimeError, match="triton cannot be imported"):
        facto.relu(x)
    facto.relu(x).sum().backward()
    assert spy == []


def test_float64_has_no_kernel(spy):
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    with facto_fx.use_kernels("triton"), pytest.raises(RuntimeError, match="no kernel for torch.float64"):
        facto.relu(x)
    facto.relu(x)
    assert spy == []


def test_use_kernels_rejects_unknown_mode():
    with pytest.raises(ValueError, match="kernels must be one of"), facto_fx.use_kernels("cuda"):
        pass


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=str)
def test_setting_composes_with_torch_compile(memory_format):
    """The hooks that set the mode are skipped by dynamo: one graph, same numbers as eager, on NCHW
    and on channels_last maps (whose ops the fakes plan with the kernels' layouts)."""
    torch._dynamo.reset()
    x = torch.randn(1, 3, 6, 6).contiguous(memory_format=memory_format)
    explanation = torch._dynamo.explain(_fmodel("triton"))(x)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    expected_out, expected_grads = _step(_fmodel("torch"), x)
    out, grads = _step(torch.compile(_fmodel("triton"), backend="aot_eager", fullgraph=True), x)
    torch.testing.assert_close(out, expected_out)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[f"_orig_mod.{name}"], grad, msg=name)
