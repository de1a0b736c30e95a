"""facto fewbit_activation: y is torch's f bit for bit, and backward gives grad_y · level[code] from
a few bits per element: torch's own gradient for the exact functions (kinks included), a Lloyd-Max
quantised f′ for the smooth ones."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from saved_tensors import saved_tensors as _saved
from torch._subclasses.fake_tensor import FakeTensorMode

import facto_fx.ops as facto
from facto_fx.ops import fewbit
from facto_fx.ops.bitpack import unpack_bits

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (function, keyword parameters, torch's own function with them)
EXACT = [
    ("relu", {}, torch.relu),
    ("relu6", {}, F.relu6),
    ("hardtanh", {}, F.hardtanh),
    ("hardtanh", {"min_val": -0.3, "max_val": 0.7}, lambda x: F.hardtanh(x, -0.3, 0.7)),
    ("leaky_relu", {}, F.leaky_relu),
    ("leaky_relu", {"negative_slope": 0.2}, lambda x: F.leaky_relu(x, 0.2)),
    ("leaky_relu", {"negative_slope": -0.5}, lambda x: F.leaky_relu(x, -0.5)),
    ("hardsigmoid", {}, F.hardsigmoid),
]
SMOOTH = [
    ("silu", {}, F.silu),
    ("gelu", {}, F.gelu),
    ("gelu", {"approximate": "tanh"}, lambda x: F.gelu(x, approximate="tanh")),
    ("hardswish", {}, F.hardswish),
    ("mish", {}, F.mish),
    ("sigmoid", {}, torch.sigmoid),
    ("tanh", {}, torch.tanh),
    ("elu", {}, F.elu),
    ("elu", {"alpha": 0.5}, lambda x: F.elu(x, 0.5)),
]


def _ids(cases):
    return ["-".join([name, *(f"{k}={v}" for k, v in params.items())]) for name, params, _ in cases]


def _table(function, params, bits):
    return fewbit.level_table(*fewbit.resolve(function, params), bits)


def _layouts(dtype, seed=0):
    """Odd sizes and batch 1; contiguous, channels_last and a non-contiguous slice."""
    g = torch.Generator().manual_seed(seed)
    wide = (torch.randn(2, 3, 5, 14, generator=g) * 3).to(dtype)
    return {
        "1-d": (torch.randn(13, generator=g) * 3).to(dtype),
        "batch-1": (torch.randn(1, 3, 5, 7, generator=g) * 3).to(dtype),
        "channels_last": (torch.randn(2, 3, 5, 7, generator=g) * 3).to(dtype).to(memory_format=torch.channels_last),
        "sliced": wide[..., ::2],
    }


@pytest.mark.parametrize(("function", "params", "reference"), EXACT + SMOOTH, ids=_ids(EXACT + SMOOTH))
def test_forward_is_torchs_bit_for_bit(function, params, reference):
    for dtype in DTYPES:
        for layout, x in _layouts(dtype).items():
            y = facto.fewbit_activation(x.requires_grad_(), function, 2, **params)
            expected = reference(x.detach())
            assert torch.equal(y, expected), (dtype, layout)
            assert y.dtype == dtype and y.stride() == expected.stride(), (dtype, layout)


def _kinks(function, params, dtype):
    """Every point where torch's derivative changes, the bounds as `dtype` rounds them, infinities,
    signed zeros and random values."""
    points = [-6.0, -3.0, -1.0, -0.0, 0.0, 1.0, 3.0, 6.0, -math.inf, math.inf]
    points += [float(torch.tensor(p, dtype=dtype)) for p in params.values()]
    g = torch.Generator().manual_seed(1)
    random = torch.randn(64, generator=g, dtype=torch.float64) * 4
    return torch.cat([torch.tensor(points, dtype=torch.float64), random]).to(dtype)


@pytest.mark.parametrize(("function", "params", "reference"), EXACT, ids=_ids(EXACT))
def test_exact_functions_give_torchs_gradient(function, params, reference):
    """At the kinks too (relu6 and hardtanh pass nothing at either bound, hardsigmoid nothing at
    ±3, leaky_relu its slope at 0), for infinite inputs, and where grad_y is infinite or NaN."""
    for dtype in [*DTYPES, torch.float64]:
        for bits in (1, 4):
            x = _kinks(function, params, dtype)
            grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
            grad_y[:4] = torch.tensor([math.inf, -math.inf, math.inf, math.nan])
            grad_y[-3:] = math.inf
            ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
            y, expected = facto.fewbit_activation(ours, function, bits, **params), reference(theirs)
            torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)
            y.backward(grad_y)
            expected.backward(grad_y)
            torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=0, equal_nan=True, msg=f"{dtype} {bits}")


def test_nan_inputs_of_exact_functions():
    """torch's CPU backward of relu6 and hardtanh gives a NaN input 0 in its vectorised loop but
    passes the gradient in its scalar tail (and on CUDA); ours always passes it, as torch's relu
    does; leaky_relu gives its slope, hardsigmoid 0, as torch's do everywhere."""
    x = torch.full((3,), math.nan, requires_grad=True)
    grad_y = torch.tensor([2.0, -1.0, math.inf])
    for function, params, factor in [("relu", {}, 1.0), ("relu6", {}, 1.0), ("hardtanh", {"max_val": 2.0}, 1.0),
                                     ("leaky_relu", {"negative_slope": 0.5}, 0.5), ("hardsigmoid", {}, 0.0)]:
        x.grad = None
        facto.fewbit_activation(x, function, 1, **params).backward(grad_y)
        assert torch.equal(x.grad, grad_y * factor if factor else torch.zeros(3)), function


def test_exact_level_tables():
    """Two exact levels and 1-bit codes whatever bits asks for; the slope decides the order."""
    assert _table("relu6", {}, 8).levels == (0.0, 1.0) and _table("relu6", {}, 8).bits == 1
    assert _table("leaky_relu", {"negative_slope": 0.2}, 2).levels == (0.2, 1.0)
    assert _table("leaky_relu", {"negative_slope": 3.0}, 2).levels == (1.0, 3.0)
    assert _table("hardsigmoid", {}, 1).levels == (0.0, float(torch.tensor(1 / 6, dtype=torch.float32)))
    table = _table("hardtanh", {"min_val": -2.0, "max_val": 0.5}, 4)
    assert (table.params, table.levels, table.boundaries, table.exact) == ((-2.0, 0.5), (0.0, 1.0), (0.5,), True)


def _autograd_derivative(reference, x: torch.Tensor) -> torch.Tensor:
    """torch.autograd's f′(x), in fp32."""
    x32 = x.detach().float().requires_grad_()
    (derivative,) = torch.autograd.grad(reference(x32).sum(), x32)
    return derivative


@pytest.mark.parametrize(("function", "params", "reference"), SMOOTH, ids=_ids(SMOOTH))
def test_smooth_gradient_is_grad_y_times_the_level_of_torchs_derivative(function, params, reference):
    """grad_x = grad_y · level[code], the code recomputed from torch.autograd's f′(x) and the
    boundaries; elements whose f′ lies within 1e-5 of a boundary are skipped (two fp32 formulas of
    f′ may put them on either side), and they are few (bf16 repeats values, so a few may coincide)."""
    for dtype in DTYPES:
        for bits in (2, 4):
            x = (torch.randn(2, 3, 8, 9, generator=torch.Generator().manual_seed(bits)) * 2).to(dtype)
            x = x.contiguous(memory_format=torch.channels_last) if dtype == torch.bfloat16 else x
            grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
            table = _table(function, params, bits)
            derivative = _autograd_derivative(reference, x)
            boundaries = torch.tensor(table.boundaries)
            code = torch.bucketize(derivative.contiguous(), boundaries)
            near = ((derivative.unsqueeze(-1) - boundaries).abs() < 1e-5).any(-1)
            expected = (grad_y.float() * torch.tensor(table.levels)[code]).to(dtype)
            leaf = x.clone().requires_grad_()
            facto.fewbit_activation(leaf, function, bits, **params).backward(grad_y)
            assert leaf.grad.dtype == dtype
            assert torch.equal(leaf.grad[~near], expected[~near]), (dtype, bits)
            assert near.float().mean() < 0.02, (dtype, bits)


# Relative L2 error of grad_x against torch's exact gradient, X ~ N(0, 1) and grad_y ~ N(0, 1)
# independent, measured on 2**16 samples (seed 0); it is sqrt(E[(q(f′) − f′)²] / E[f′²]), which
# quantization_mse predicts from the grid to within 2 % at every point here (checked below). The
# thresholds sit about 10 % above the measurements.
GRADIENT_ERROR = {  # function: {bits: (measured, threshold)}
    "silu": {1: (0.290, 0.32), 2: (0.144, 0.16), 4: (0.0353, 0.04), 8: (0.0022, 0.0025)},
    "gelu": {1: (0.290, 0.32), 2: (0.132, 0.15), 4: (0.0318, 0.035), 8: (0.0020, 0.0023)},
    "gelu_tanh": {1: (0.290, 0.32), 2: (0.132, 0.15), 4: (0.0318, 0.035), 8: (0.0020, 0.0023)},
    "hardswish": {1: (0.327, 0.36), 2: (0.184, 0.2), 4: (0.0497, 0.055), 8: (0.0031, 0.0035)},
    "mish": {1: (0.266, 0.3), 2: (0.126, 0.14), 4: (0.0303, 0.034), 8: (0.0019, 0.0021)},
    "sigmoid": {1: (0.113, 0.125), 2: (0.0576, 0.064), 4: (0.0147, 0.0165), 8: (0.00094, 0.00105)},
    "tanh": {1: (0.213, 0.235), 2: (0.103, 0.115), 4: (0.0255, 0.028), 8: (0.0016, 0.0018)},
    "elu": {1: (0.144, 0.16), 2: (0.0649, 0.072), 4: (0.0152, 0.017), 8: (0.00094, 0.00105)},
}


@pytest.mark.parametrize(("function", "params", "reference"), SMOOTH[:-1], ids=_ids(SMOOTH[:-1]))
def test_gradient_error_falls_with_bits(function, params, reference):
    g = torch.Generator().manual_seed(0)
    x, grad_y = torch.randn(1 << 16, generator=g), torch.randn(1 << 16, generator=g)
    exact = grad_y * _autograd_derivative(reference, x)
    errors = {}
    for bits in (1, 2, 4, 8):
        leaf = x.clone().requires_grad_()
        facto.fewbit_activation(leaf, function, bits, **params).backward(grad_y)
        errors[bits] = float((leaf.grad - exact).norm() / exact.norm())
        table = _table(function, params, bits)
        values, weights = fewbit.reference_distribution(table.function, table.params)
        predicted = math.sqrt(fewbit.quantization_mse(table) / float((weights * values**2).sum()))
        assert errors[bits] == pytest.approx(predicted, rel=0.02), bits
    name = fewbit.resolve(function, params)[0]
    assert all(errors[bits] < threshold for bits, (_, threshold) in GRADIENT_ERROR[name].items()), errors
    assert errors[1] > errors[2] > errors[4] > errors[8], errors


@pytest.mark.parametrize("function", ["silu", "gelu", "gelu_tanh", "hardswish", "mish", "sigmoid", "tanh", "elu"])
def test_lloyd_max_table_beats_uniform_levels(function):
    """Sorted levels, boundaries at their midpoints, and a smaller E[(q(f′) − f′)²] on N(0, 1) than
    uniform levels over the range of f′ (cells of equal width, each with its midpoint)."""
    params = fewbit.resolve(function, {})[1]
    values, _ = fewbit.reference_distribution(function, params)
    low, high = float(values.min()), float(values.max())
    for bits in (1, 2, 4, 8):
        table = fewbit.level_table(function, params, bits)
        n = 1 << bits
        assert table.bits == bits and len(table.levels) == n and len(table.boundaries) == n - 1
        assert all(a < b for a, b in zip(table.levels, table.levels[1:], strict=False))
        assert table.boundaries == tuple((a + b) / 2 for a, b in zip(table.levels, table.levels[1:], strict=False))
        uniform_levels = tuple(low + (i + 0.5) * (high - low) / n for i in range(n))
        uniform = dataclasses.replace(
            table, levels=uniform_levels,
            boundaries=tuple((a + b) / 2 for a, b in zip(uniform_levels, uniform_levels[1:], strict=False)),
        )
        assert fewbit.quantization_mse(table) <= fewbit.quantization_mse(uniform), bits


def test_level_tables_are_cached_and_depend_on_the_parameters():
    assert fewbit.level_table("silu", [], 2) is fewbit.level_table("silu", (), 2)
    assert fewbit.level_table("elu", [0.5], 2).levels != fewbit.level_table("elu", [1.0], 2).levels
    assert _table("gelu", {"approximate": "tanh"}, 2).function == "gelu_tanh"
    assert _table("gelu", {"approximate": "tanh"}, 2).levels != _table("gelu", {}, 2).levels


@pytest.mark.parametrize(("function", "params", "bits"), [("silu", {}, 1), ("silu", {}, 2), ("gelu", {}, 4),
                                                          ("mish", {}, 8), ("hardtanh", {}, 4), ("relu6", {}, 1)])
@pytest.mark.parametrize("shape", [(13,), (2, 3, 5, 7)])
def test_saves_only_the_packed_codes(function, params, bits, shape):
    """ceil(numel · bits / 8) uint8 bytes, and nothing else (an exact function's codes take 1 bit)."""
    x = torch.randn(shape).requires_grad_()
    saved = _saved(lambda: facto.fewbit_activation(x, function, bits, **params))
    stored_bits = 1 if function in fewbit.EXACT_FUNCTIONS else bits
    assert [(t.dtype, t.numel()) for t in saved] == [(torch.uint8, math.ceil(x.numel() * stored_bits / 8))]


def test_codes_are_packed_in_memory_order():
    """A channels_last map's codes are those of its (N, H, W, C) memory order."""
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    table = fewbit.level_table("silu", (), 4)
    (packed,) = _saved(lambda: facto.fewbit_activation(x.requires_grad_(), "silu", 4))
    expected = table.codes(x.permute(0, 2, 3, 1)).reshape(-1)
    assert torch.equal(unpack_bits(packed, 4, x.numel()).int(), expected)


def test_non_finite_inputs_get_defined_codes():
    """±inf take the code of ±64 (f′ has reached its asymptote there); NaN takes code 0, or for
    hardswish and elu the x > 0 branch, as torch's backward does; the gradient stays finite."""
    special = torch.tensor([math.nan, math.inf, -math.inf, 0.5])
    for function in ("silu", "gelu", "gelu_tanh", "mish", "sigmoid", "tanh", "hardswish", "elu"):
        table = fewbit.level_table(function, fewbit.resolve(function, {})[1], 2)
        leaf = special.clone().requires_grad_()
        (packed,) = _saved(lambda f=function, t=leaf: facto.fewbit_activation(t, f, 2))
        codes = unpack_bits(packed, 2, 4).tolist()
        nan_code = int(table.codes(torch.tensor([1.0]))) if function in ("hardswish", "elu") else 0
        assert codes[0] == nan_code, function
        assert codes[1:3] == table.codes(torch.tensor([64.0, -64.0])).tolist(), function
        facto.fewbit_activation(leaf, function, 2).sum().backward()
        assert leaf.grad.isfinite().all(), function


def test_no_grad_path_is_the_plain_function():
    x = torch.randn(3, 4, requires_grad=True)
    with torch.no_grad():
        y = facto.fewbit_activation(x, "gelu", 2, approximate="tanh")
    assert y.grad_fn is None and torch.equal(y, F.gelu(x, approximate="tanh"))
    assert torch.equal(facto.fewbit_activation(x.detach(), "leaky_relu", 1, negative_slope=0.3),
                       F.leaky_relu(x.detach(), 0.3))


@pytest.mark.parametrize(("call", "message"), [
    (lambda x: facto.fewbit_activation(x, "swish", 2), r"function must be one of \('relu', .*'silu'"),
    (lambda x: facto.fewbit_activation(x, "silu", 3), r"bits must be one of \(1, 2, 4, 8\); got 3"),
    (lambda x: facto.fewbit_activation(x, "silu", True), r"bits must be one of"),
    (lambda x: facto.fewbit_activation(x, "leaky_relu", 1, slope=0.1), r"leaky_relu takes no parameter slope "
                                                                        r"\(it takes: negative_slope\)"),
    (lambda x: facto.fewbit_activation(x, "silu", 2, alpha=1.0), r"silu takes no parameter alpha \(it takes: none\)"),
    (lambda x: facto.fewbit_activation(x, "gelu", 2, approximate="erf"), r"gelu's approximate must be"),
    (lambda x: facto.fewbit_activation(x, "hardtanh", 1, min_val=1.0, max_val=0.0), r"hardtanh's max_val"),
    (lambda x: facto.fewbit_activation(x, "elu", 2, alpha=math.inf), r"elu's alpha must be finite"),
    (lambda x: torch.ops.facto.fewbit_activation(x, "hardtanh", [1.0], 1), r"params of hardtanh must be "
                                                                           r"\(min_val, max_val\); got \[1.0\]"),
    (lambda x: torch.ops.facto.fewbit_activation(x, "silu", [], 16), r"bits must be one of"),
])
def test_invalid_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.randn(4, requires_grad=True))


def _metadata(outputs):
    return [(t.dtype, tuple(t.shape), t.stride()) for t in outputs]


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast-bf16"])
def test_fakes_agree_with_real_outputs(autocast):
    """Every function's fake gives the real op's dtypes, shapes and strides; under CPU bf16
    autocast the op casts nothing (an activation: on no autocast list), so y keeps x's dtype."""
    x = torch.randn(2, 3, 5, 7).contiguous(memory_format=torch.channels_last)
    op = torch.ops.facto.fewbit_activation.default
    for function, params, _ in EXACT + SMOOTH:
        name, values = fewbit.resolve(function, params)
        for dtype, bits in ((torch.float32, 2), (torch.float16, 8)):
            args = (x.to(dtype), name, list(values), bits)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                real = op(*args)
                with FakeTensorMode() as mode:
                    fake = op(mode.from_tensor(args[0]), *args[1:])
            assert _metadata(real) == _metadata(fake) and real[0].dtype == dtype, (function, dtype)


@pytest.mark.parametrize(("function", "params", "bits"), [("hardtanh", [-0.5, 2.0], 1), ("gelu_tanh", [], 8)])
def test_opcheck(function, params, bits):
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.facto.fewbit_activation.default, (x, function, params, bits))


def test_torch_compile_fullgraph_matches_eager():
    """aot_eager: the fake and the backward formula are traced, no code generated."""

    def step(x):
        return (facto.fewbit_activation(x, "silu", 2) * facto.fewbit_activation(x, "hardtanh", 1, max_val=0.5)).sum()

    x = torch.randn(2, 3, 4, 5)
    eager, compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    step(eager).backward()
    torch.compile(step, backend="aot_eager", fullgraph=True)(compiled).backward()
    assert torch.equal(compiled.grad, eager.grad)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize(("x_layout", "grad_layout"), [("nchw", "nchw"), ("nhwc", "nhwc"), ("nhwc", "nchw")])
def test_a_map_of_many_pieces_gives_grad_y_times_its_levels(bits, x_layout, grad_layout):
    """A map the CPU backward runs in several pieces (ops/chunks.py), its size no multiple of a byte's
    codes or of a piece: grad_y · levels[code] at every element, the codes recomputed from x by
    the table (silu; relu6 for 1 bit, torch's own gradient there)."""
    formats = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(3, 17, 101, 103, generator=g) * 3).contiguous(memory_format=formats[x_layout])
    grad_y = torch.randn(x.shape, generator=g).contiguous(memory_format=formats[grad_layout])
    function = "relu6" if bits == 1 else "silu"
    table = fewbit.level_table(function, [], bits)
    leaf = x.clone().requires_grad_()
    facto.fewbit_activation(leaf, function, bits).backward(grad_y)
    expected = grad_y * torch.tensor(table.levels)[table.codes(x).long()]
    assert torch.equal(leaf.grad, expected)


def test_a_selecting_function_passes_zero_for_an_infinite_gradient_in_every_piece():
    """relu6's zero level passes 0 even where grad_y is inf or NaN (torch's backward selects), in
    pieces after the first too."""
    x = torch.randn(4, 16, 90, 91, generator=torch.Generator().manual_seed(0)) * 4
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    grad_y.view(-1)[::1001] = math.inf
    grad_y.view(-1)[7::1003] = math.nan
    leaf, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    facto.fewbit_activation(leaf, "relu6", 1).backward(grad_y)
    F.relu6(ref).backward(grad_y)
    assert torch.equal(leaf.grad.isnan(), ref.grad.isnan())
    assert torch.equal(leaf.grad.nan_to_num(), ref.grad.nan_to_num())
