"""Every method's gradients on a real model, against a reference computed without that method.

Run by benchmarks/compatibility.py for every model (its "gradients" column):

    python benchmarks/compatibility.py --models resnet18 timm:efficientnet_b0 --image-size 32 --out -

Each check runs in float64, both models in eval mode with gradients on (frozen batch-norm is the
dense model's eval-mode batch-norm, and dropout / drop-path draw nothing), the loss a fixed random
projection of the output:

- **facto**: `compile(apply_ratio=1.0, lossy_kernel=1)`, M of every layer perturbed away from 0.
  Reference: a deep copy of the original whose compressed weights are Ω = W + M·D, by plain
  autograd. grad_M must equal grad_Ω·Dᵀ (Ω flattened to O × C·k_h·k_w for a conv), every other
  trainable parameter's gradient the reference's.
- **strips**: `RowStrips(3)` over the same Facto model (lossy kernel 2): every gradient equals the
  unsplit Facto model's (no region: "-").
- **hosvd**: HOSVD at eps = 1 on every conv and linear layer, the rest dense: equals the dense model.
- **fewbit**: few-bit derivative codes on every activation, the rest dense (`activation_bits=8`):
  the whole model's gradient within 2e-2 of the dense model's (as eb's, over all parameters at
  once). A 1-bit code of an exact activation (ReLU6, hardtanh, leaky ReLU, hardsigmoid) is
  lossless (mobilenet_v2: 0); an 8-bit code of a smooth one is off by about 0.2 % of the gradient
  through it (32², measured: mobilenet_v3_small 8e-4, efficientnet_b0 5e-3). The other checks
  compile with `activation_bits=None` and `store_bits=None`: each its method alone (`ALONE`).
- **fixed**: the fixed-rate store at 8 bits (`store_bits=8`) on every depthwise / grouped conv,
  product of feature maps and layer / group norm, the rest dense: the whole model's gradient within
  2e-2 of the dense model's (stochastic rounding is unbiased, so one draw is off by its noise alone).
- **eb**: ErrorBounded on every op it takes, relative bound 1e-6 of each map's range: the whole
  model's gradient within 1e-3 of the dense model's, a thousand times the bound; a wrong code or op
  moves it by O(1). Measured over all parameters at once, not per parameter: where a saved value
  lies within the bound of a kink (ReLU6 at 0 and 6, Hardswish at ±3), its code may fall on the
  other side and pass one element's gradient the other way. No bound on the values excludes that
  (mobilenet_v2: 1.7e-3 at a bound of 1e-6, 3e-9 at 1e-7), so a model with such values (counted on
  the dense model's forward, for activation modules) needs only finite gradients, and its error is
  shown with that count.

Every check also requires finite gradients. The error of a check is the largest, over parameters,
of |g − g_ref| / |g_ref| (norms; a parameter whose reference gradient is near zero is measured
against the model's mean gradient norm instead).
"""

from __future__ import annotations

import copy
import gc
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import facto_fx
from facto_fx.layers import FactoConv2d, FactoLinear
from facto_fx.methods import HOSVD, ErrorBounded, RowStrips

LOSSLESS = 1e-6  # float64: rounding is ~1e-12; a wrong formula or a cut tile is ~1e-2
EB_BOUND = 1e-6
EB_TOLERANCE = 1e-3
FEWBIT_BITS, FEWBIT_TOLERANCE = 8, 2e-2
FIXED_BITS, FIXED_TOLERANCE = 8, 2e-2
ALONE = {"activation_bits": None, "store_bits": None}  # the default plan's codes and store off
WHOLE_MODEL = ("eb", "fewbit", "fixed")  # lossy: judged over all parameters at once, not per parameter
TOLERANCE = {"facto": LOSSLESS, "strips": LOSSLESS, "hosvd": LOSSLESS, "eb": EB_TOLERANCE, "fewbit": FEWBIT_TOLERANCE,
             "fixed": FIXED_TOLERANCE}
METHODS = tuple(TOLERANCE)


@dataclass
class GradientCheck:
    """One method's check: its error (None: not applicable) and what went wrong, if anything."""

    method: str
    error: float | None = None
    problem: str = ""
    note: str = ""  # why an error beyond the tolerance is no problem

    @property
    def ok(self) -> bool:
        return not self.problem


def _projection_loss(out: object, seed: int = 1) -> Tensor:
    """A fixed random projection of every floating tensor of the output (a tuple of logits too)."""
    tensors = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if torch.is_floating_point(t)]
    generator = torch.Generator().manual_seed(seed)
    return sum((t * torch.randn(t.shape, generator=generator, dtype=t.dtype)).sum() for t in tensors)


def _gradients(model: nn.Module, x: Tensor) -> None:
    model.eval()
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        _projection_loss(model(x)).backward()


def _error(actual: Tensor | None, expected: Tensor | None, scale: float) -> float:
    if actual is None or expected is None:
        return math.inf if (actual is None) != (expected is None) else 0.0
    if not torch.isfinite(actual).all():
        return math.nan
    difference, denominator = (actual - expected).norm().item(), max(expected.norm().item(), scale)
    if denominator == 0:  # every reference gradient is zero (NF-nets' zero-initialised branch gains)
        return 0.0 if difference == 0 else math.inf
    return difference / denominator


def _worst(errors: dict[str, float]) -> tuple[float, str]:
    name = max(errors, key=lambda n: math.inf if math.isnan(errors[n]) else errors[n])
    return errors[name], name


def _judge(method: str, errors: dict[str, float]) -> GradientCheck:
    if not errors:
        return GradientCheck(method, problem="no trainable parameter got a gradient")
    error, name = _worst(errors)
    check = GradientCheck(method, error)
    if math.isnan(error):
        check.problem = f"{method}: non-finite gradient of {name}"
    elif error > TOLERANCE[method]:
        check.problem = f"{method}: {name}'s gradient off by {error:.1e}"
    return check


def _mean_norm(grads: Sequence[Tensor]) -> float:
    norms = [g.norm().item() for g in grads if g is not None]
    return 1e-8 * (sum(norms) / len(norms) if norms else 1.0)


def _compare_by_identity(fmodel: nn.Module, names: dict[int, str], reference: nn.Module,
                         skip: set[int] = frozenset()) -> dict[str, float]:
    """Each trainable parameter of `fmodel` that is one of the original model's (`names`, by id)
    against the reference's parameter of that name."""
    pairs = [(names[id(p)], p.grad, reference.get_parameter(names[id(p)]).grad)
             for p in fmodel.parameters() if p.requires_grad and id(p) not in skip and id(p) in names]
    scale = _mean_norm([r for _, _, r in pairs])
    return {name: _error(g, r, scale) for name, g, r in pairs}


def _perturbed_low_rank(fmodel: nn.Module) -> list[nn.Module]:
    """The Facto layers of `fmodel`, their M set to a fixed draw away from 0 (at M = 0, grad_M
    would not see a wrong D or a wrong merge)."""
    layers = [m for m in fmodel.modules() if isinstance(m, (FactoConv2d, FactoLinear))]
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in layers:
            layer.M.copy_(torch.randn(layer.M.shape, generator=generator, dtype=layer.M.dtype) * 1e-2)
    return layers


def check_facto(build: Callable[[], nn.Module], x: Tensor) -> GradientCheck:
    """grad_M against the dense model's gradient of the merged weight, projected by D."""
    model = build().double()
    names = {id(p): n for n, p in model.named_parameters()}
    reference = copy.deepcopy(model)
    fmodel = facto_fx.compile(model, apply_ratio=1.0, lossy_kernel=1, example_inputs=(x,), **ALONE)
    layers = _perturbed_low_rank(fmodel)
    with torch.no_grad():
        for layer in layers:
            weight = reference.get_parameter(names[id(layer.weight)])
            weight.copy_(layer.weight + (layer.M @ layer.D).reshape(layer.weight.shape))
    _gradients(fmodel, x)
    _gradients(reference, x)
    errors = _compare_by_identity(fmodel, names, reference, skip={id(layer.M) for layer in layers})
    scale = _mean_norm([reference.get_parameter(names[id(layer.weight)]).grad for layer in layers])
    for layer in layers:
        omega = reference.get_parameter(names[id(layer.weight)]).grad
        expected = None if omega is None else omega.reshape(omega.shape[0], -1) @ layer.D.T
        errors[f"{names[id(layer.weight)]} (M)"] = _error(layer.M.grad, expected, scale)
    return _judge("facto", errors)


def check_strips(build: Callable[[], nn.Module], x: Tensor) -> GradientCheck:
    """Facto run in row strips against the same Facto model unsplit."""
    model = build().double()
    options = {"apply_ratio": 1.0, "lossy_kernel": 2, "example_inputs": (x,), **ALONE}
    split = facto_fx.compile(copy.deepcopy(model), row_strips=RowStrips(3), **options)
    if not any(d.region for d in facto_fx.decisions(split)):
        return GradientCheck("strips")
    whole = facto_fx.compile(model, **options)
    _perturbed_low_rank(whole)
    split.load_state_dict(whole.state_dict())
    _gradients(whole, x)
    _gradients(split, x)
    expected = {n: p.grad for n, p in whole.named_parameters() if p.requires_grad}
    scale = _mean_norm(list(expected.values()))
    return _judge("strips", {n: _error(p.grad, expected[n], scale)
                             for n, p in split.named_parameters() if p.requires_grad})


def _check_against_dense(method: str, config: dict, build: Callable[[], nn.Module], x: Tensor) -> GradientCheck:
    model = build().double()
    names = {id(p): n for n, p in model.named_parameters()}
    reference = copy.deepcopy(model)
    fmodel = facto_fx.compile(model, apply_ratio=0.0, example_inputs=(x,), **{**ALONE, **config})
    if not any(d.rewritten and d.method is not None and d.method.label == method for d in facto_fx.decisions(fmodel)):
        return GradientCheck(method)
    _gradients(fmodel, x)
    near = _values_near_kinks(reference, x, EB_BOUND) if method == "eb" else 0
    _gradients(reference, x)
    errors = _compare_by_identity(fmodel, names, reference)
    if method not in WHOLE_MODEL or not errors or any(math.isnan(e) for e in errors.values()):
        return _judge(method, errors)
    check = _judge(method, {"the model": _whole_model_error(fmodel, names, reference)})
    if near and check.problem:  # the bound allows those elements' gradients to go either way
        check.problem, check.note = "", f"{near} values within the bound of a kink"
    return check


# Activations whose derivative jumps, and where: a saved value within the bound of a kink may be
# coded on its other side, which passes that element's gradient the other way.
_KINKS: dict[type[nn.Module], Callable[[nn.Module], tuple[float, ...]]] = {
    nn.ReLU: lambda m: (0.0,), nn.LeakyReLU: lambda m: (0.0,), nn.ReLU6: lambda m: (0.0, 6.0),
    nn.Hardtanh: lambda m: (m.min_val, m.max_val), nn.Hardswish: lambda m: (-3.0, 3.0),
    nn.Hardsigmoid: lambda m: (-3.0, 3.0),
}


def _values_near_kinks(model: nn.Module, x: Tensor, relative: float) -> int:
    """How many inputs of the model's kinked activation modules lie within `relative` of their
    map's range from a kink (counted on a forward of the dense model)."""
    count = 0

    def hook(module: nn.Module, inputs: tuple) -> None:
        nonlocal count
        (value,) = inputs[:1]
        bound = relative * (value.max() - value.min())
        for kink in _KINKS[type(module)](module):
            count += int(((value - kink).abs() <= bound).sum())

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if type(m) in _KINKS]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    return count


def _whole_model_error(fmodel: nn.Module, names: dict[int, str], reference: nn.Module) -> float:
    """|g − g_ref| / |g_ref| over every trainable parameter at once."""
    pairs = [(p.grad, reference.get_parameter(names[id(p)]).grad) for p in fmodel.parameters()
             if p.requires_grad and id(p) in names and p.grad is not None]
    actual = torch.cat([g.flatten() for g, _ in pairs])
    expected = torch.cat([r.flatten() for _, r in pairs])
    return _error(actual, expected, 0.0)


def check_hosvd(build: Callable[[], nn.Module], x: Tensor) -> GradientCheck:
    """HOSVD at eps = 1 on every conv and linear layer against the dense model."""
    return _check_against_dense("hosvd", {"methods": {"*": HOSVD(eps=1.0)}}, build, x)


def check_error_bounded(build: Callable[[], nn.Module], x: Tensor) -> GradientCheck:
    """ErrorBounded (relative bound EB_BOUND) on every op it takes against the dense model."""
    config = {"methods": {"*": ErrorBounded(EB_BOUND, relative=True)}}
    return _check_against_dense("eb", config, build, x)


def check_fewbit(build: Callable[[], nn.Module], x: Tensor) -> GradientCheck:
    """Few-bit derivative codes on every activation (FEWBIT_BITS for the smooth ones, 1 bit, exact,
    for the others) against the dense model."""
    return _check_against_dense("fewbit", {"activation_bits": FEWBIT_BITS}, build, x)


def check_fixed_rate(build: Callable[[], nn.Module], x: Tensor) -> GradientCheck:
    """The fixed-rate store at FIXED_BITS on every layer it takes against the dense model."""
    return _check_against_dense("fixed", {"store_bits": FIXED_BITS}, build, x)


CHECKS = {"facto": check_facto, "strips": check_strips, "hosvd": check_hosvd, "eb": check_error_bounded,
          "fewbit": check_fewbit, "fixed": check_fixed_rate}


def check_gradients(build: Callable[[], nn.Module], x: Tensor,
                    methods: Sequence[str] = METHODS) -> list[GradientCheck]:
    """Each method's check on a fresh model from `build`; an exception is that method's problem."""
    x = x.double()
    results = []
    for method in methods:
        gc.collect()  # the last check's models: a float64 copy of a large model is gigabytes
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results.append(CHECKS[method](build, x))
        except Exception as error:  # a check that cannot run is a failed check, with its reason
            results.append(GradientCheck(method, problem=f"{method}: {type(error).__name__}: {error}"[:200]))
    return results


def summary(results: Sequence[GradientCheck]) -> str:
    """'facto 3e-14, strips -, ...' for a table cell."""
    return ", ".join(f"{r.method} {'-' if r.error is None else format(r.error, '.0e')}"
                     + (f" ({r.note})" if r.note else "") for r in results)
