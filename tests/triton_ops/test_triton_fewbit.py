"""Triton few-bit activations: y, the packed codes and the gradient agree with facto_fx.ops.fewbit's
PyTorch path, for every function, bit width and dtype, channels_last maps read in place.

The interpreter stores fp32 results to bf16 by truncation where a GPU rounds to nearest even, so
bf16 results are compared with the reference truncated the same way (`_stored`): still exactly.
"""

import math

import pytest
import torch
from kernel_cases import DTYPES, KernelSpy, channels_last, in_layout, noncontiguous, randn, run_op, tolerance

from facto_fx.ops import fewbit
from facto_fx.ops.bitpack import pack_bits, unpack_bits
from facto_fx.shapes import is_channels_last
from facto_fx.triton_ops import fewbit as triton_fewbit
from facto_fx.triton_ops.fewbit import fewbit_backward, fewbit_forward

# NaN and infinite inputs and gradients make numpy warn inside the interpreter's arithmetic
INVALID_VALUES = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

FUNCTIONS = [(name, tuple(default for _, default in params)) for name, params in fewbit.FUNCTIONS.items()]
FUNCTIONS += [("hardtanh", (-0.3, 0.7)), ("leaky_relu", (-0.5,)), ("elu", (0.5,))]
# y by comparisons and at most one product: the same bits as torch's in fp32 (the others use exp,
# erf, tanh or a product by 1/6 where torch's CPU kernels divide by 6: within an ulp)
PIECEWISE_LINEAR = ("relu", "relu6", "hardtanh", "leaky_relu")


def _ids(cases):
    return ["-".join([name, *map(str, params)]) for name, params in cases]


def _stored(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An fp32 result as the interpreter stores it in `dtype`: truncated to bf16 (normal numbers)."""
    if dtype != torch.bfloat16:
        return t.to(dtype)
    return (t.float().view(torch.int32) & -65536).view(torch.float32).to(dtype)


def _launch(x, table):
    return fewbit_forward(x, table.function, table.params, table.bits, torch.tensor(table.boundaries))


def _assert_codes_agree(x, table, packed, expected):
    """Equal codes, except where f′(x) lies within 1e-6 of a boundary (8 fp32 ulps of f′: numpy's
    exp and erf are not torch's, and the interpreter's tanh, log1p and expm1 not libdevice's, so f′
    may land on either side there; none has so far)."""
    codes, reference = (unpack_bits(p, table.bits, x.numel()) for p in (packed, expected))
    derivative = table.derivative(x.permute(0, 2, 3, 1) if is_channels_last(x) else x).reshape(-1)
    near = ((derivative.unsqueeze(-1) - torch.tensor(table.boundaries)).abs() < 1e-6).any(-1)
    assert torch.equal(codes[~near], reference[~near]) and near.float().mean() < 0.05


@pytest.mark.parametrize(("function", "params"), FUNCTIONS, ids=_ids(FUNCTIONS))
def test_forward_matches_the_pytorch_path(function, params):
    for bits in (1, 2, 4, 8):
        table = fewbit.level_table(function, params, bits)
        for dtype in DTYPES:
            x = randn((3, 5, 7), dtype, seed=bits) * 3
            x.view(-1)[:6] = torch.tensor([-3.0, 0.0, 3.0, 6.0, -0.3, 0.7], dtype=dtype)  # kinks
            y, packed = _launch(x, table)
            y_ref, expected = torch.ops.facto.fewbit_activation(x, function, list(params), bits)
            assert y.dtype == dtype and packed.dtype == torch.uint8 and packed.shape == expected.shape
            _assert_codes_agree(x, table, packed, expected)
            if function in PIECEWISE_LINEAR:
                assert torch.equal(y, _stored(table.forward(x.float()), dtype)), (bits, dtype)
            else:
                torch.testing.assert_close(y, y_ref, **tolerance(dtype))


@pytest.mark.parametrize(("function", "params"), [("silu", ()), ("relu6", ())], ids=["silu", "relu6"])
@pytest.mark.parametrize("bits", [1, 8])
def test_codes_span_several_blocks(function, params, bits):
    """Each program packs whole bytes of its block; the last block is partial."""
    table = fewbit.level_table(function, params, bits)
    x = randn((2, 1030), torch.float32) * 3
    _, packed = _launch(x, table)
    _assert_codes_agree(x, table, packed, pack_bits(table.codes(x), table.bits))


def _expected_grad(grad_y, packed, table, channels_last=False):
    """The PyTorch path's gradient, computed from grad_y in fp32 and stored as the kernel stores it."""
    return _stored(fewbit.grad_input(grad_y.float(), packed, table, channels_last), grad_y.dtype)


@INVALID_VALUES
@pytest.mark.parametrize(("function", "params"), [("silu", ()), ("hardtanh", (-0.5, 1.5)), ("leaky_relu", (0.0,))],
                         ids=["silu", "hardtanh", "leaky_relu-slope-0"])
def test_backward_is_grad_y_times_the_level(function, params):
    """Every bit width; where torch's backward selects (hardtanh), a zero level passes 0 even for an
    infinite gradient; where it multiplies (leaky_relu, here with slope 0), inf · 0 stays NaN."""
    for bits in (1, 2, 4, 8):
        table = fewbit.level_table(function, params, bits)
        for dtype in DTYPES:
            x, grad_y = randn((2, 3, 5, 7), dtype) * 2, randn((2, 3, 5, 7), dtype, seed=1)
            grad_y.view(-1)[::7] = math.inf
            packed = pack_bits(table.codes(x), table.bits)
            grad_x = fewbit_backward(grad_y, packed, torch.tensor(table.levels), table.bits, table.selects)
            torch.testing.assert_close(grad_x, _expected_grad(grad_y, packed, table), rtol=0, atol=0, equal_nan=True)
            assert grad_x.isnan().any() == (function == "leaky_relu")


@pytest.mark.parametrize(("function", "params", "bits"), [("silu", [], 4), ("hardtanh", [-1.0, 1.0], 2),
                                                          ("gelu_tanh", [], 8), ("mish", [], 1)])
@pytest.mark.parametrize("grad_layout", ["channels_last", "contiguous"])
def test_channels_last_input_matches_the_pytorch_path(function, params, bits, grad_layout, monkeypatch):
    """A channels_last map is read in place and gives the PyTorch path's layout, codes in (N, H, W, C)
    order and gradient, whatever the layout of grad_y."""
    table = fewbit.level_table(function, params, bits)
    for dtype in DTYPES:
        x = channels_last(randn((2, 3, 5, 7), dtype) * 2)
        grad_y = in_layout(randn(x.shape, dtype, seed=1), grad_layout)
        forward = KernelSpy.install(monkeypatch, triton_fewbit, "_fewbit_fwd_kernel")
        backward = KernelSpy.install(monkeypatch, triton_fewbit, "_fewbit_bwd_kernel")
        y, packed, (grad_x,) = run_op(torch.ops.facto.fewbit_activation, x, function, params, bits,
                                      kernels="triton", grad_y=grad_y)
        assert forward.read_in_place(x)
        assert backward.read_in_place(grad_y) == (grad_layout == "channels_last")  # else a copy in x's layout
        y_ref, expected, _ = run_op(torch.ops.facto.fewbit_activation, x, function, params, bits,
                                    kernels="torch", grad_y=grad_y)
        assert y.stride() == y_ref.stride() == x.stride()
        torch.testing.assert_close(y, y_ref, **tolerance(dtype))
        _assert_codes_agree(x, table, packed, expected)
        assert torch.equal(grad_x, _expected_grad(grad_y, packed, table, channels_last=True))
        monkeypatch.undo()


def test_noncontiguous_input_packs_in_logical_order():
    table = fewbit.level_table("gelu", (), 2)
    x = noncontiguous((2, 3, 5, 6), torch.float32)
    y, packed = _launch(x, table)
    torch.testing.assert_close(y, table.forward(x), **tolerance(torch.float32))
    _assert_codes_agree(x.contiguous(), table, packed, pack_bits(table.codes(x), table.bits))


@INVALID_VALUES
def test_non_finite_inputs_get_the_pytorch_paths_codes():
    x = torch.tensor([math.nan, math.inf, -math.inf, 1.0, -1.0, 0.0, math.nan, 2.5])
    for function, params in FUNCTIONS:
        table = fewbit.level_table(function, params, 2)
        y, packed = _launch(x, table)
        y_ref, expected = torch.ops.facto.fewbit_activation(x, function, list(params), 2)
        assert torch.equal(packed, expected), function
        if function in PIECEWISE_LINEAR:
            torch.testing.assert_close(y, y_ref, rtol=0, atol=0, equal_nan=True)


def test_empty_input():
    table = fewbit.level_table("silu", (), 4)
    y, packed = _launch(torch.empty(0, 3), table)
    assert y.shape == (0, 3) and packed.numel() == 0
    grad_x = fewbit_backward(torch.empty(0, 3), packed, torch.tensor(table.levels), 4, False)
    assert grad_x.shape == (0, 3)
