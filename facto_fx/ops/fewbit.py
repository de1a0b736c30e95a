"""facto::fewbit_activation — an elementwise activation whose backward keeps its derivative, not its
input, quantised to 1, 2, 4 or 8 bits per element (Novikov et al., "Few-Bit Backward: Quantized
Gradients of Activation Functions", ICML 2023).

For y = f(x), backward needs only f′(x). The forward returns y = f(x) exactly as torch computes it
(it calls torch's own function) and a code per element: the index of the level interval holding
f′(x), code = #{boundaries < f′(x)}. Backward gives grad_x = grad_y · level[code].

Level tables (`level_table`, one frozen `FewBitTable` per function, parameters and bits, cached):

- Exact functions, whose derivative takes two values: relu, relu6 and hardtanh (f′ ∈ {0, 1}),
  leaky_relu ({slope, 1}) and hardsigmoid ({0, 1/6}). Their table is that level set with 1-bit
  codes, whatever `bits` asks for, and the gradient is torch's own, bit for bit, kinks included:
  f′ follows torch's backward at them (relu6 and hardtanh pass no gradient at either bound,
  hardsigmoid none at ±3, leaky_relu the slope at 0, relu none at 0), and where torch's backward
  selects the gradient or 0 (all but leaky_relu), a zero level passes 0 even for an infinite
  gradient, as torch's does.
- Smooth functions: silu, gelu (approximate "none" and "tanh", the latter named "gelu_tanh" in the
  op), hardswish, mish, sigmoid, tanh and elu. Their 2**bits levels are a Lloyd-Max quantiser of
  the random variable f′(X), X ~ N(0, 1): levels are conditional means of their cells, boundaries
  the midpoints between neighbouring levels, iterated to a fixed point on a grid of 16384 points
  of [-8, 8] weighted by the normal density (float64, deterministic, 10-40 ms per table on a CPU).

f′ is computed in fp32 for fp32, bf16 and fp16 inputs (in float64 for float64 ones) and the gradient
is rounded once to the input's dtype. Codes are packed in x's memory order (ops/bitpack.py), so a
channels_last map costs no copy. The op casts nothing under autocast (an activation is on no
autocast list): y and the gradient take x's dtype.

Non-finite inputs: y is torch's, and every code is defined.
- Exact functions: ±inf take the level of their side. A NaN input passes the gradient through relu,
  relu6 and hardtanh (as torch's CUDA and scalar CPU kernels do; torch's vectorised CPU loop gives
  relu6 and hardtanh 0 there), leaky_relu's slope times it, and nothing through hardsigmoid.
- Smooth functions: f′ is evaluated at x clamped to [-64, 64], where every f′ here has reached its
  asymptote, so ±inf take the level of their tail (torch's own gradient there is NaN for silu, gelu
  and mish). A NaN input takes the x > 0 branch of hardswish's and elu's f′ (as torch's scalar
  kernels do), and otherwise code 0, the lowest level: a NaN f′ lies above no boundary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from facto_fx.ops.bitpack import empty_in_code_order, in_code_order, pack_pieces, unpack_bits, unpack_flags
from facto_fx.ops.chunks import packed_pieces
from facto_fx.ops.grads import records_gradient, register_autograd
from facto_fx.shapes import SUPPORTED_BITS, is_channels_last
from facto_fx.triton_ops.dispatch import current_mode, use_triton

# Each function's parameters, (name, default), in the order the op's `params` list takes them.
FUNCTIONS: dict[str, tuple[tuple[str, float], ...]] = {
    "relu": (),
    "relu6": (),
    "hardtanh": (("min_val", -1.0), ("max_val", 1.0)),
    "leaky_relu": (("negative_slope", 0.01),),
    "hardsigmoid": (),
    "silu": (),
    "gelu": (),
    "gelu_tanh": (),
    "hardswish": (),
    "mish": (),
    "sigmoid": (),
    "tanh": (),
    "elu": (("alpha", 1.0),),
}
EXACT_FUNCTIONS = ("relu", "relu6", "hardtanh", "leaky_relu", "hardsigmoid")
# Exact functions whose torch backward selects grad_y or 0 (0 · inf gives 0, not NaN).
_SELECTING = ("relu", "relu6", "hardtanh", "hardsigmoid")

# torch's hardsigmoid backward multiplies by the fp32 constant 1.0f / 6.0f, for float64 too.
ONE_SIXTH = float(torch.tensor(1.0 / 6.0, dtype=torch.float32))
# A smooth function's f′ is evaluated at x clamped to this: every one has reached its asymptote
# (to far below fp32's resolution) and none overflows there in fp32, so ±inf get their tail's code.
DERIVATIVE_CLAMP = 64.0

_GRID_POINTS = 1 << 14
_GRID_HALF_WIDTH = 8.0
_LLOYD_ITERATIONS = 100


# torch's own f(x, *params), per function.
_TORCH_FUNCTIONS = {
    "relu": torch.relu,
    "relu6": F.relu6,
    "hardtanh": F.hardtanh,
    "leaky_relu": F.leaky_relu,
    "hardsigmoid": F.hardsigmoid,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "hardswish": F.hardswish,
    "mish": F.mish,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "elu": F.elu,
}


def _apply(function: str, x: Tensor, params: Sequence[float]) -> Tensor:
    """torch's own f(x)."""
    if function not in _TORCH_FUNCTIONS:
        raise ValueError(_unknown(function))
    return _TORCH_FUNCTIONS[function](x, *params)


def _derivative(function: str, x: Tensor, params: Sequence[float]) -> Tensor:
    """f′(x) in x's (floating) dtype, by the formulas of torch's backward kernels, which also fix
    the value at each kink.

    Branches are products with 0 / 1 flags (`_flag`), not torch.where, which runs 20-30 times slower
    than a product on a CPU. One factor of each product is 0, so the value is exactly one branch's;
    the ramps of hardswish and elu read x with NaN as +64 and clamped to ±64, where no term is
    non-finite and every branch has reached the value it takes at ±inf.
    """
    if function == "relu":
        return 1 - _flag(torch.le, x, 0.0)
    if function in ("relu6", "hardtanh"):
        low, high = (0.0, 6.0) if function == "relu6" else params
        return 1 - torch.maximum(_flag(torch.le, x, low), _flag(torch.ge, x, high))
    if function == "leaky_relu":
        positive = _flag(torch.gt, x, 0.0)
        return positive + (1 - positive) * params[0]
    if function == "hardsigmoid":
        return _flag(torch.gt, x, -3.0).mul_(_flag(torch.lt, x, 3.0)).mul_(ONE_SIXTH)
    if function in ("hardswish", "elu"):
        x = x.nan_to_num(nan=DERIVATIVE_CLAMP).clamp_(-DERIVATIVE_CLAMP, DERIVATIVE_CLAMP)
    if function == "hardswish":  # torch's CPU convention at ±3 (its CUDA kernel takes the ramp's ends)
        ramp = _flag(torch.lt, x, 3.0)
        return (1 - _flag(torch.le, x, -3.0)) * (ramp * (x / 3 + 0.5) + (1 - ramp))
    if function == "elu":
        negative = _flag(torch.le, x, 0.0)
        return negative * (params[0] * torch.exp(x.clamp(max=0.0))) + (1 - negative)
    x = x.clamp(-DERIVATIVE_CLAMP, DERIVATIVE_CLAMP)
    if function == "silu":
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    if function == "gelu":
        cdf = 0.5 * (1 + torch.erf(x * math.sqrt(0.5)))
        return cdf + x * torch.exp(-0.5 * x * x) * (0.5 * math.sqrt(2 / math.pi))
    if function == "gelu_tanh":
        beta, kappa = math.sqrt(2 / math.pi), 0.044715
        t = torch.tanh(beta * (x + kappa * x * x * x))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * beta * (1 + 3 * kappa * x * x)
    if function == "mish":
        t = torch.tanh(torch.log1p(torch.exp(x)))
        return t + x * torch.sigmoid(x) * (1 - t * t)
    if function == "sigmoid":
        s = torch.sigmoid(x)
        return s * (1 - s)
    if function == "tanh":
        t = torch.tanh(x)
        return 1 - t * t
    raise ValueError(_unknown(function))


def _flag(compare, x: Tensor, value: float) -> Tensor:
    """compare(x, value) as 0 / 1 in x's dtype: written straight into a float tensor against a 0-d
    threshold, 5-10 times faster on a CPU than a bool result converted."""
    return compare(x, torch.tensor(value, dtype=x.dtype, device=x.device), out=torch.empty_like(x))


def _unknown(function: object) -> str:
    return f"function must be one of {tuple(FUNCTIONS)}; got {function!r}"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype f′ and the gradient are computed in: float64 for float64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass(frozen=True)
class FewBitTable:
    """The quantiser of one function's derivative: code = #{boundaries < f′(x)}, f′ ≈ levels[code].

    `bits` is the code width stored per element: the `bits` asked for, or 1 for an exact function.
    """

    function: str
    params: tuple[float, ...]
    bits: int
    levels: tuple[float, ...]
    boundaries: tuple[float, ...]
    exact: bool

    @property
    def selects(self) -> bool:
        """Whether a zero level passes 0 whatever grad_y is (torch's backward selects, not multiplies)."""
        return self.function in _SELECTING

    def forward(self, x: Tensor) -> Tensor:
        """torch's f(x), bit for bit."""
        return _apply(self.function, x, self.params)

    def derivative(self, x: Tensor) -> Tensor:
        """The reference f′(x), computed in fp32 (float64 for a float64 x)."""
        return _derivative(self.function, x.to(compute_dtype(x.dtype)), self.params)

    def codes(self, x: Tensor) -> Tensor:
        """Each element's code (an integer tensor shaped like x): the index of the level interval
        holding f′(x)."""
        return _bucketize(self.derivative(x), self.boundaries)

    def dequantize(self, codes: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """levels[codes], in `dtype`."""
        return constant(self.levels, dtype, codes)[codes.long()]


COMPARED_BOUNDARIES = 15  # up to 4 bits a sum of comparisons beats a binary search (3x at 2 bits on a CPU)


def _bucketize(d: Tensor, boundaries: tuple[float, ...]) -> Tensor:
    """#{b in boundaries : b < d} for each element of d; NaN counts none."""
    if len(boundaries) <= COMPARED_BOUNDARIES:
        codes, above = torch.zeros_like(d), torch.empty_like(d)
        for boundary in constant(boundaries, d.dtype, d).unbind():
            codes += torch.gt(d, boundary, out=above)  # NaN is above no boundary
        return codes.to(torch.int8).view(torch.uint8)  # (by int8: torch's float → uint8 is 8x slower)
    d = torch.nan_to_num(d, nan=-math.inf, posinf=math.inf, neginf=-math.inf).contiguous()
    return torch.bucketize(d, constant(boundaries, d.dtype, d), out_int32=True)


def constant(values: tuple[float, ...], dtype: torch.dtype, like: Tensor) -> Tensor:
    """A small table as a tensor on `like`'s device; cached for real accelerator tensors, built
    afresh on the CPU and while tracing (a cached real tensor cannot enter a fake trace)."""
    if like.device.type == "cpu" or is_fake(like):
        return torch.tensor(values, dtype=dtype, device=like.device)
    return _cached_constant(values, dtype, like.device)


@functools.lru_cache(maxsize=256)
def _cached_constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def check_bits(bits: object) -> int:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}; got {bits!r}")
    return int(bits)


def check_params(function: object, params: Sequence[float]) -> tuple[float, ...]:
    """`params` of `function` (positional, in FUNCTIONS' order, all of them) as floats, validated."""
    if not isinstance(function, str) or function not in FUNCTIONS:
        raise ValueError(_unknown(function))
    names = [name for name, _ in FUNCTIONS[function]]
    if len(params) != len(names):
        raise ValueError(f"params of {function} must be ({', '.join(names)}); got {list(params)}")
    values = tuple(float(p) for p in params)
    for name, value in zip(names, values, strict=True):
        if not math.isfinite(value):
            raise ValueError(f"{function}'s {name} must be finite; got {value}")
    if function == "hardtanh" and values[0] > values[1]:
        raise ValueError(f"hardtanh's max_val ({values[1]}) must not be less than its min_val ({values[0]})")
    return values


def resolve(function: str, params: dict[str, object]) -> tuple[str, tuple[float, ...]]:
    """(the op's function name, its params list) for `function` called with keyword `params`
    (torch's names; the rest take torch's defaults). gelu's approximate="tanh" names "gelu_tanh"."""
    params = dict(params)
    if function == "gelu" and "approximate" in params:
        approximate = params.pop("approximate")
        if approximate not in ("none", "tanh"):
            raise ValueError(f"gelu's approximate must be 'none' or 'tanh'; got {approximate!r}")
        function = "gelu_tanh" if approximate == "tanh" else "gelu"
    if not isinstance(function, str) or function not in FUNCTIONS:
        raise ValueError(_unknown(function))
    known = dict(FUNCTIONS[function])
    unknown = sorted(set(params) - set(known))
    if unknown:
        accepted = ", ".join([*known, *(["approximate"] if function.startswith("gelu") else [])]) or "none"
        raise ValueError(f"{function} takes no parameter {', '.join(unknown)} (it takes: {accepted})")
    return function, check_params(function, [params.get(name, default) for name, default in known.items()])


def level_table(function: str, params: Sequence[float] = (), bits: int = 2) -> FewBitTable:
    """The (cached) table of `function` with `params` (positional, see FUNCTIONS) at `bits` bits."""
    return _level_table(function, check_params(function, params), check_bits(bits))


@functools.cache
def _level_table(function: str, params: tuple[float, ...], bits: int) -> FewBitTable:
    if function in EXACT_FUNCTIONS:
        levels = _exact_levels(function, params)
        return FewBitTable(function, params, 1, levels, ((levels[0] + levels[1]) / 2,), exact=True)
    values, weights = reference_distribution(function, params)
    levels, boundaries = _lloyd_max(values, weights, 1 << bits)
    return FewBitTable(function, params, bits, levels, boundaries, exact=False)


def _exact_levels(function: str, params: tuple[float, ...]) -> tuple[float, float]:
    if function == "leaky_relu":
        low, high = sorted((params[0], 1.0))
        return low, high
    if function == "hardsigmoid":
        return 0.0, ONE_SIXTH
    return 0.0, 1.0


@functools.cache
def _reference_inputs() -> tuple[Tensor, Tensor]:
    """Midpoints of a uniform grid of [-8, 8] and their N(0, 1) probabilities (float64, summing to 1)."""
    step = 2 * _GRID_HALF_WIDTH / _GRID_POINTS
    x = -_GRID_HALF_WIDTH + (torch.arange(_GRID_POINTS, dtype=torch.float64) + 0.5) * step
    weights = torch.exp(-0.5 * x * x)
    return x, weights / weights.sum()


def reference_distribution(function: str, params: Sequence[float] = ()) -> tuple[Tensor, Tensor]:
    """f′(X) for X ~ N(0, 1) as (values, probabilities) on the reference grid, float64."""
    x, weights = _reference_inputs()
    return _derivative(function, x, check_params(function, params)), weights


def quantization_mse(table: FewBitTable) -> float:
    """E[(levels[code(X)] - f′(X))²] for X ~ N(0, 1), on the reference grid."""
    values, weights = reference_distribution(table.function, table.params)
    codes = _bucketize(values, table.boundaries)
    levels = torch.tensor(table.levels, dtype=torch.float64)
    return float((weights * (levels[codes.long()] - values) ** 2).sum())


def _lloyd_max(values: Tensor, weights: Tensor, n_levels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Lloyd-Max quantiser of a discrete distribution: levels = means of their cells, boundaries =
    midpoints, iterated until the cells stop changing (at most _LLOYD_ITERATIONS steps).

    It starts from the high-resolution optimum's level density, proportional to the cube root of
    the values' density (Panter & Dite), which it refines in a few dozen steps where uniform levels
    take hundreds (and sit in a worse fixed point: half the MSE at 8 bits for sigmoid). The values
    are sorted once, so a step is a search of the boundaries among them and differences of
    cumulative sums. A cell that empties keeps its level, so the levels stay sorted.
    """
    values, order = torch.sort(values)
    weights = weights[order]
    mass = F.pad(torch.cumsum(weights, 0), (1, 0))
    moment = F.pad(torch.cumsum(weights * values, 0), (1, 0))
    levels = _companded_levels(values, weights, n_levels)
    boundaries = (levels[1:] + levels[:-1]) / 2
    cells = None
    for _ in range(_LLOYD_ITERATIONS):
        cut = _count_at_most(values, boundaries)
        if cells is not None and torch.equal(cut, cells):
            break
        cells = cut
        edges = F.pad(F.pad(cut, (1, 0), value=0), (0, 1), value=values.numel())
        cell_mass = mass[edges[1:]] - mass[edges[:-1]]
        cell_moment = moment[edges[1:]] - moment[edges[:-1]]
        levels = torch.where(cell_mass > 0, cell_moment / cell_mass.clamp(min=1e-300), levels)
        boundaries = (levels[1:] + levels[:-1]) / 2
    return tuple(levels.tolist()), tuple(boundaries.tolist())


def _companded_levels(values: Tensor, weights: Tensor, n_levels: int, bins: int = 1024) -> Tensor:
    """n_levels levels at the quantiles (i + 1/2) / n_levels of a density proportional to the cube
    root of the (sorted) values' histogram over their range."""
    low, high = float(values[0]), float(values[-1])
    if high <= low:
        return torch.full((n_levels,), low, dtype=torch.float64)
    index = ((values - low) * (bins / (high - low))).long().clamp_(max=bins - 1)
    density = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, weights).pow_(1 / 3)
    cdf = F.pad(torch.cumsum(density, 0), (1, 0))
    cdf /= cdf[-1].clone()
    q = (torch.arange(n_levels, dtype=torch.float64) + 0.5) / n_levels
    bin_ = (torch.searchsorted(cdf, q, right=True) - 1).clamp_(0, bins - 1)
    within = (q - cdf[bin_]) / (cdf[bin_ + 1] - cdf[bin_]).clamp(min=1e-300)
    return low + (bin_ + within) * ((high - low) / bins)


def _count_at_most(values: Tensor, boundaries: Tensor) -> Tensor:
    """#{values <= b} for each boundary b (values sorted): the values a boundary puts below it.

    Searched in chunks of at most 200 boundaries: torch's searchsorted splits more queries across
    threads, whose start-up costs more than this search, and stalls for long on a busy machine.
    """
    return torch.cat([torch.searchsorted(values, chunk, right=True) for chunk in boundaries.split(200)])


@torch.library.custom_op("facto::fewbit_activation", mutates_args=())
def fewbit_activation_fwd(x: Tensor, function: str, params: list[float], bits: int) -> tuple[Tensor, Tensor]:
    table = level_table(function, params, bits)
    if use_triton(x):
        from facto_fx.triton_ops.fewbit import fewbit_forward

        return fewbit_forward(x, table.function, table.params, table.bits, constant(table.boundaries, torch.float32, x))
    return _forward(x, function, params, bits)


def _forward(x: Tensor, function: str, params: list[float], bits: int) -> tuple[Tensor, Tensor]:
    """The PyTorch path; on fake tensors, the fake kernel (same dtypes, shapes and strides).

    The codes are computed on f′ flattened in x's memory order (a view for a channels_last x), which
    is the order pack_bits(codes, bits, is_channels_last(x)) stores them in, a piece at a time.
    """
    table = level_table(function, params, bits)
    flat = in_code_order(x, is_channels_last(x))
    return table.forward(x), pack_pieces(flat, table.bits, table.codes)  # f′'s chain stays in cache


fewbit_activation_fwd.register_fake(_forward)


def _setup_context(ctx, inputs, output):
    x, function, params, bits = inputs
    ctx.save_for_backward(output[1])
    ctx.table = level_table(function, params, bits)  # a constant of the call, not a saved activation
    ctx.channels_last = is_channels_last(x)  # the order the codes were packed in
    ctx.kernels = current_mode()
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_codes):
    (packed,) = ctx.saved_tensors
    table: FewBitTable = ctx.table
    if use_triton(grad_y, ctx.kernels):
        from facto_fx.triton_ops.fewbit import fewbit_backward

        levels = constant(table.levels, torch.float32, grad_y)
        grad_x = fewbit_backward(grad_y, packed, levels, table.bits, table.selects, ctx.channels_last)
        return grad_x, None, None, None
    return grad_input(grad_y, packed, table, ctx.channels_last), None, None, None


def _level_reader(table: FewBitTable, dtype: torch.dtype, device: torch.device) -> Callable[[Tensor, int], Tensor]:
    """A function giving levels[code] of the first `numel` codes of packed bytes, 1-D in `dtype`.

    Below 8 bits each byte is looked up whole in a table of its 8 / bits levels (built once here):
    a quarter of the lookups at 2 bits, and no unpacking. 1-bit codes on a little-endian machine are
    flag · high + (1 − flag) · low instead, of which one term is 0."""
    if table.bits == 8:
        return lambda packed, numel: table.dequantize(packed[:numel], dtype)
    if table.bits == 1 and sys.byteorder == "little":
        low, high = table.levels

        def read_flags(packed: Tensor, numel: int) -> Tensor:
            flag = unpack_flags(packed)[:numel].clamp_(max=1).to(dtype)
            factor = flag if high == 1 else flag.mul(high)
            return factor if low == 0 else factor.add_((1 - flag).mul_(low))

        return read_flags
    per_byte = 8 // table.bits
    codes = unpack_bits(torch.arange(256, dtype=torch.uint8, device=device), table.bits, 256 * per_byte)
    by_byte = table.dequantize(codes, dtype).view(256, per_byte)
    return lambda packed, numel: torch.index_select(by_byte, 0, packed.long()).view(-1)[:numel]


def grad_input(grad_y: Tensor, packed: Tensor, table: FewBitTable, channels_last: bool = False) -> Tensor:
    """grad_y · levels[code], computed in fp32 (float64 for float64) and rounded to grad_y's dtype, in
    the codes' layout. On the CPU it runs piece by piece (ops/chunks.py): the levels are never a
    full-size temporary beside the gradient."""
    dtype = compute_dtype(grad_y.dtype)
    read = _level_reader(table, dtype, grad_y.device)
    zero_passes_zero = table.selects and not _finite_on_cpu(grad_y)  # even for an inf / NaN gradient
    grad_x, out = empty_in_code_order(grad_y, channels_last)
    flat = in_code_order(grad_y, channels_last)
    for codes, elements in packed_pieces(flat.numel(), 8 // table.bits, grad_y):
        factor = read(packed[codes], elements.stop - elements.start)
        product = flat[elements] * factor
        out[elements] = torch.where(factor != 0, product, 0.0) if zero_passes_zero else product
    return grad_x


def _finite_on_cpu(t: Tensor) -> bool:
    """Whether t, a real CPU tensor, is all finite (its sum is: one fast reduction; a sum that only
    overflows answers no, which costs a torch.where and is still right). Other tensors answer no
    without a look: no host sync, and a compiled backward traces no data-dependent branch."""
    return t.device.type == "cpu" and not is_fake(t) and bool(torch.isfinite(t.sum()))


register_autograd(fewbit_activation_fwd, _backward, _setup_context)


def fewbit_activation(x: Tensor, function: str, bits: int, **params: float | str) -> Tensor:
    """`function`(x) (torch's, bit for bit) whose backward keeps f′(x) in `bits` bits per element.

    `params` are torch's keyword arguments of the function (negative_slope, min_val / max_val,
    alpha, gelu's approximate), defaulting as torch's do. Without a gradient to compute, this is
    the plain torch function.
    """
    function, values = resolve(function, params)
    bits = check_bits(bits)
    if not records_gradient(x):
        return _apply(function, x, values)
    return torch.ops.facto.fewbit_activation(x, function, list(values), bits)[0]
