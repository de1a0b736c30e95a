"""Few-bit activations: forward writes y = f(x) and the packed code of f′(x) in one pass; backward
reads the codes and grad_y and writes grad_y · level[code].

f and f′ are computed in fp32 from x by the formulas of torch's CUDA kernels (opmath fp32, one
rounding to y's dtype), with libdevice's exp / tanh / log1p / expm1, which are what those kernels
call. The Triton interpreter cannot call libdevice: under TRITON_INTERPRET=1 these four come from
tl.exp instead (tanh, log1p and expm1 then lose some relative accuracy near 0, well within an fp32
ulp of y's scale). f′ follows facto_fx.ops.fewbit's reference, clamped to [-64, 64] for the smooth
functions. The code is found by a binary search of the sorted boundaries (BITS loads per element
from a table of at most 255 fp32 values); a NaN f′ gets code 0, as in the reference.

Both kernels walk the map in memory order, so a channels_last map is neither copied nor reordered
and its codes come out in (N, H, W, C) order, as ops/bitpack.py packs them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from facto_fx.shapes import packed_numel
from facto_fx.triton_ops.bitpack import load_codes, store_packed
from facto_fx.triton_ops.dispatch import interpreter_enabled
from facto_fx.triton_ops.layout import in_layout, kernel_layout

BLOCK = 1024

FUNCTION_IDS = {
    name: i for i, name in enumerate(
        ("relu", "relu6", "hardtanh", "leaky_relu", "hardsigmoid", "silu", "gelu", "gelu_tanh", "hardswish", "mish",
         "sigmoid", "tanh", "elu")
    )
}
_RELU: tl.constexpr = tl.constexpr(FUNCTION_IDS["relu"])
_RELU6: tl.constexpr = tl.constexpr(FUNCTION_IDS["relu6"])
_HARDTANH: tl.constexpr = tl.constexpr(FUNCTION_IDS["hardtanh"])
_LEAKY_RELU: tl.constexpr = tl.constexpr(FUNCTION_IDS["leaky_relu"])
_HARDSIGMOID: tl.constexpr = tl.constexpr(FUNCTION_IDS["hardsigmoid"])
_SILU: tl.constexpr = tl.constexpr(FUNCTION_IDS["silu"])
_GELU: tl.constexpr = tl.constexpr(FUNCTION_IDS["gelu"])
_GELU_TANH: tl.constexpr = tl.constexpr(FUNCTION_IDS["gelu_tanh"])
_HARDSWISH: tl.constexpr = tl.constexpr(FUNCTION_IDS["hardswish"])
_MISH: tl.constexpr = tl.constexpr(FUNCTION_IDS["mish"])
_SIGMOID: tl.constexpr = tl.constexpr(FUNCTION_IDS["sigmoid"])
_TANH: tl.constexpr = tl.constexpr(FUNCTION_IDS["tanh"])
_ELU: tl.constexpr = tl.constexpr(FUNCTION_IDS["elu"])

_LIBDEVICE: tl.constexpr = tl.constexpr(not interpreter_enabled())
_CLAMP: tl.constexpr = tl.constexpr(64.0)  # ops/fewbit.py's DERIVATIVE_CLAMP
_ONE_SIXTH: tl.constexpr = tl.constexpr(1.0 / 6.0)  # rounded to fp32 where used: torch's 1.0f / 6.0f
_SQRT1_2: tl.constexpr = tl.constexpr(0.7071067811865476)  # M_SQRT1_2
_INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)  # M_2_SQRTPI · M_SQRT1_2 · 0.5
_GELU_BETA: tl.constexpr = tl.constexpr(0.7978845608028654)  # M_SQRT2 · M_2_SQRTPI · 0.5
_GELU_KAPPA: tl.constexpr = tl.constexpr(0.044715)
_GELU_KAPPA_3: tl.constexpr = tl.constexpr(3 * 0.044715)
# (The interpreter keeps constexpr · tensor a constexpr: these constants multiply from the right.)


@triton.jit
def _exp(x):
    if _LIBDEVICE:
        result = libdevice.exp(x)
    else:
        result = tl.exp(x)
    return result


@triton.jit
def _tanh(x):
    if _LIBDEVICE:
        result = libdevice.tanh(x)
    else:
        e = tl.exp(2.0 * tl.where(x < 0, x, -x))  # exp(-2|x|)
        t = (1.0 - e) / (1.0 + e)
        result = tl.where(x < 0, -t, t)
    return result


@triton.jit
def _log1p(x):
    if _LIBDEVICE:
        result = libdevice.log1p(x)
    else:
        result = tl.log(1.0 + x)
    return result


@triton.jit
def _expm1(x):
    if _LIBDEVICE:
        result = libdevice.expm1(x)
    else:
        result = tl.exp(x) - 1.0
    return result


@triton.jit
def _clamp(x, low, high):
    """min(max(x, low), high), keeping NaN (as std::min / std::max and torch.clamp do)."""
    return tl.where(x > high, high, tl.where(x < low, low, x))


@triton.jit
def _activation(x, P0, P1, FUNCTION: tl.constexpr):
    """(f(x), f′(x)) in fp32, for fp32 x; P0, P1 are the function's parameters in the op's order."""
    if FUNCTION == _RELU:
        y = tl.where(x < 0, 0.0, x)
        d = tl.where(x <= 0, 0.0, 1.0)
    elif FUNCTION == _RELU6:
        y = _clamp(x, 0.0, 6.0)
        d = tl.where((x <= 0) | (x >= 6.0), 0.0, 1.0)
    elif FUNCTION == _HARDTANH:
        y = _clamp(x, P0, P1)
        d = tl.where((x <= P0) | (x >= P1), 0.0, 1.0)
    elif FUNCTION == _LEAKY_RELU:
        y = tl.where(x > 0, x, x * P0)
        d = tl.where(x > 0, 1.0, P0)
    elif FUNCTION == _HARDSIGMOID:
        y = _clamp(x + 3.0, 0.0, 6.0) * _ONE_SIXTH
        d = tl.where((x > -3.0) & (x < 3.0), _ONE_SIXTH, 0.0)
    elif FUNCTION == _HARDSWISH:
        y = x * _clamp(x + 3.0, 0.0, 6.0) * _ONE_SIXTH
        d = tl.where(x <= -3.0, 0.0, tl.where(x < 3.0, x / 3.0 + 0.5, 1.0))
    elif FUNCTION == _ELU:
        y = tl.where(x > 0, x, _expm1(x) * P0)
        d = tl.where(x <= 0, P0 * _exp(x), 1.0)
    else:
        c = _clamp(x, -_CLAMP, _CLAMP)  # f′ only: y takes x itself
        if FUNCTION == _SILU:
            y = x / (1.0 + _exp(-x))
            s = 1.0 / (1.0 + _exp(-c))
            d = s * (1.0 + c * (1.0 - s))
        elif FUNCTION == _GELU:
            y = x * 0.5 * (1.0 + tl.erf(x * _SQRT1_2))
            d = 0.5 * (1.0 + tl.erf(c * _SQRT1_2)) + c * (_exp(-0.5 * c * c) * _INV_SQRT_2PI)
        elif FUNCTION == _GELU_TANH:
            y = 0.5 * x * (1.0 + _tanh((x + (x * x * x) * _GELU_KAPPA) * _GELU_BETA))
            t = _tanh((c + (c * c * c) * _GELU_KAPPA) * _GELU_BETA)
            d = 0.5 * (1.0 + t) + 0.5 * c * (1.0 - t * t) * ((1.0 + (c * c) * _GELU_KAPPA_3) * _GELU_BETA)
        elif FUNCTION == _MISH:
            y = x * _tanh(_log1p(_exp(x)))
            t = _tanh(_log1p(_exp(c)))
            d = t + c * (1.0 / (1.0 + _exp(-c))) * (1.0 - t * t)
        elif FUNCTION == _SIGMOID:
            y = 1.0 / (1.0 + _exp(-x))
            s = 1.0 / (1.0 + _exp(-c))
            d = s * (1.0 - s)
        else:
            tl.static_assert(FUNCTION == _TANH)
            y = _tanh(x)
            t = _tanh(c)
            d = 1.0 - t * t
    return y, d


@triton.jit
def _code(d, bounds_ptr, BITS: tl.constexpr):
    """#{b in bounds : b < d} for sorted bounds of 2**BITS - 1 values, by binary search; 0 for NaN."""
    code = tl.zeros(d.shape, tl.int32)
    for step in tl.static_range(BITS):
        candidate = code + (1 << (BITS - 1 - step))
        code = tl.where(d > tl.load(bounds_ptr + candidate - 1), candidate, code)
    return code


@triton.jit
def _fewbit_fwd_kernel(
    x_ptr, y_ptr, code_ptr, bounds_ptr, n, P0, P1,
    FUNCTION: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offsets = start + tl.arange(0, BLOCK)
    in_bounds = offsets < n
    x = tl.load(x_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    y, d = _activation(x, P0, P1, FUNCTION)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=in_bounds)
    store_packed(code_ptr, _code(d, bounds_ptr, BITS), start, n, BLOCK, BITS)


@triton.jit
def _fewbit_bwd_kernel(
    grad_y_ptr, code_ptr, levels_ptr, grad_x_ptr, n, BITS: tl.constexpr, SELECTS: tl.constexpr, BLOCK: tl.constexpr
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < n
    grad = tl.load(grad_y_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    level = tl.load(levels_ptr + load_codes(code_ptr, offsets, in_bounds, BITS), mask=in_bounds, other=0.0)
    grad_x = grad * level
    if SELECTS:
        grad_x = tl.where(level != 0, grad_x, 0.0)  # 0 for a zero level, even for an inf gradient (as torch)
    tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=in_bounds)


def fewbit_forward(
    x: Tensor, function: str, params: tuple[float, ...], bits: int, boundaries: Tensor
) -> tuple[Tensor, Tensor]:
    """(f(x), packed codes of f′(x) against the fp32 `boundaries`, `bits` each).

    y is channels_last if x is (else contiguous); the codes are in y's memory order.
    """
    x, _ = kernel_layout(x)
    y = torch.empty_like(x)
    codes = torch.empty(packed_numel(x.numel(), bits), dtype=torch.uint8, device=x.device)
    p0, p1 = (*(float(p) for p in params), 0.0, 0.0)[:2]
    if x.numel():
        _fewbit_fwd_kernel[(triton.cdiv(x.numel(), BLOCK),)](
            x, y, codes, boundaries, x.numel(), p0, p1, FUNCTION=FUNCTION_IDS[function], BITS=bits, BLOCK=BLOCK
        )
    return y, codes


def fewbit_backward(
    grad_y: Tensor, codes: Tensor, levels: Tensor, bits: int, selects: bool, channels_last: bool = False
) -> Tensor:
    """grad_y · levels[code] (fp32 `levels`), 0 for a zero level if `selects`; channels_last says
    the codes' order (x's layout in forward), which grad_x takes."""
    grad_y = in_layout(grad_y, channels_last)
    grad_x = torch.empty_like(grad_y)
    if grad_y.numel():
        _fewbit_bwd_kernel[(triton.cdiv(grad_y.numel(), BLOCK),)](
            grad_y, codes, levels, grad_x, grad_y.numel(), BITS=bits, SELECTS=selects, BLOCK=BLOCK
        )
    return grad_x
