"""Every facto op agrees with its fake kernel, for every dtype, layout and autocast state.

torch.compile plans a graph from the fakes alone; a fake that says fp32 where the op returns bf16,
or contiguous where it returns channels_last, breaks compiled training (ops/autocast.py has the
autocast policy these tests pin down). Each case compares the real outputs' dtype, shape and
strides with the fake outputs', then runs torch.library.opcheck (its compiled check on a subset
that still covers every dtype and layout).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import facto_fx.ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "channels_last", "strided"]
AUTOCAST = [None, torch.bfloat16]


def _input(dtype: torch.dtype, layout: str, shape=(2, 4, 6, 6)) -> torch.Tensor:
    torch.manual_seed(0)
    if layout == "strided":  # every other column of a wider map: not contiguous in any format
        wide = torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype)
        return wide[..., ::2].requires_grad_()
    x = torch.randn(shape, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def _params(*shapes, scale=1.0):
    return [(torch.randn(s) * scale).requires_grad_() for s in shapes]


def _conv(x, out_channels=5, stride=1):
    weight, M, bias = _params((out_channels, 4, 3, 3), (out_channels, 2), (out_channels,))
    D = torch.randn(2, 36)
    folded = facto_fx.ops.projection_filter(D, weight.shape, (stride, stride), (1, 1), 2)
    return (x, weight.detach(), M, D, folded, bias, [stride, stride], [1, 1], [1, 1], 2, None)


def _conv_factored(x):
    """Wide output, few positions: the op takes its factored path (Ω never formed)."""
    args = _conv(x, out_channels=12, stride=4)
    assert facto_fx.ops.conv.factored(x.shape, args[1].shape, (2, 2))
    return args


def _linear(x):
    flat = x.flatten(1) if x.dim() > 2 else x
    weight, M, bias = _params((3, flat.shape[1]), (3, 5), (3,))
    return (flat, weight.detach(), M, torch.randn(5, flat.shape[1]), bias, None)


def _quantized_conv(x):
    """A depthwise conv with bias, groups of 32: each 144-element sample has a short last group."""
    weight, bias = _params((4, 1, 3, 3), (4,))
    return (x, weight, bias, [1, 1], [1, 1], [1, 1], 4, 4, 32, torch.tensor(0))


def _quantized_mul(x):
    """x times a (2, 1, 6, 6) map in x's dtype: both kept quantized (36 elements a sample)."""
    (other,) = _params((2, 1, 6, 6))
    return (x, other.detach().to(x.dtype).requires_grad_(), 4, 32, torch.tensor(0), True, True)


def _norm_parts(group_norm: bool):
    """Layer norm over the last dim (6) or group norm in 2 groups; γ, β and 8-element groups of codes."""
    weight, bias = _params((4 if group_norm else 6,), (4 if group_norm else 6,))
    return (2 if group_norm else [6], weight, bias, 1e-5, 4, 8, torch.tensor(0))


def _batch_norm(x, bits=None):
    weight, bias = _params((4,), (4,))
    return (x, weight, bias, torch.randn(4), torch.rand(4) + 0.5, 1e-5, 2, None, True, bits, 8, _seed(bits))


def _batch_norm_stats(x, bits=None):
    """Pooled 2×2 (a 36-element sample), its x̂ coded in groups of 8 when given bits."""
    return (x, *_params((4,), (4,)), 1e-5, 2, None, bits, 8, _seed(bits))


def _seed(bits):
    return None if bits is None else torch.tensor(0)


CASES = {
    "relu": lambda x: (x,),
    "max_pool2d": lambda x: (x, [2, 2], [2, 2], [0, 0], [1, 1], False),
    "max_pool2d_overlapping": lambda x: (x, [3, 3], [2, 2], [1, 1], [1, 1], True),
    "dropout": lambda x: (x, 0.0),
    "scale": lambda x: (x, torch.full((1,), 1.5, requires_grad=True), 2, None, True),
    "batch_norm": _batch_norm,
    "batch_norm_coded": lambda x: _batch_norm(x, bits=4),
    "batch_norm_stats": _batch_norm_stats,
    "batch_norm_stats_coded": lambda x: _batch_norm_stats(x, bits=2),
    "conv2d": _conv,
    "conv2d_factored": _conv_factored,
    "linear": _linear,
    "fewbit_activation": lambda x: (x, "silu", [], 2),
    "quantized_conv2d": _quantized_conv,
    "quantized_mul": _quantized_mul,
    "quantized_layer_norm": lambda x: (x, *_norm_parts(False)),
    "quantized_group_norm": lambda x: (x, *_norm_parts(True)),
}


def _op(case: str):
    for variant in ("_overlapping", "_factored", "_coded"):
        case = case.removesuffix(variant)
    return getattr(torch.ops.facto, case).default


MATRIX = pytest.mark.parametrize(
    ("name", "dtype", "layout", "autocast"),
    [
        pytest.param(name, dtype, layout, autocast, id=f"{name}-{dtype}-{layout}-{'autocast' if autocast else 'plain'}")
        for name in CASES for dtype in DTYPES for layout in LAYOUTS for autocast in AUTOCAST
    ],
)


def _autocast(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _metadata(outputs):
    return [(t.dtype, tuple(t.shape), t.stride() if t.numel() else None) for t in outputs]


def _fake_outputs(op, args):
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        return op(*fake_args)


@MATRIX
def test_op_agrees_with_its_fake(name, dtype, layout, autocast):
    op = _op(name)
    args = CASES[name](_input(dtype, layout))
    with _autocast(autocast):
        real = op(*args)
        fake = _fake_outputs(op, args)
    assert _metadata(real) == _metadata(fake)
    cast = name.startswith(("conv2d", "linear", "quantized_conv2d"))
    x_dtype = torch.bfloat16 if autocast is not None and cast else dtype
    assert real[0].dtype == x_dtype  # the documented policy: the output takes (autocast) x's dtype


# opcheck's compiled check (AOT dispatch with dynamic shapes) costs seconds a case: it runs where
# the dtype and the layout share an index (every dtype, every layout, each with and without
# autocast), the schema, fake and autograd-registration checks run on every case.
COMPILED = {(dtype, layout) for dtype, layout in zip(DTYPES, LAYOUTS, strict=True)}
CHEAP_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


@MATRIX
def test_opcheck(name, dtype, layout, autocast):
    op = _op(name)
    checks = (*CHEAP_CHECKS, "test_aot_dispatch_dynamic") if (dtype, layout) in COMPILED else CHEAP_CHECKS
    with _autocast(autocast):
        torch.library.opcheck(op, CASES[name](_input(dtype, layout)), test_utils=checks)
