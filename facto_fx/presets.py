"""Named combinations of methods, as FactoConfigs to pass to `facto_fx.compile(model, config)`."""

from __future__ import annotations

from facto_fx.config import FactoConfig
from facto_fx.methods import ErrorBounded, MethodConfig, RowStrips
from facto_fx.methods.hosvd import on_last_layers

METHOD_CHOICES = ("facto", "hosvd", "svd", "eb", "rowstrips")


def facto_error_bounded(eb: float = 0.02, sigma: float = 0.1, every: int = 100, **facto: object) -> FactoConfig:
    """The default plan where it applies (Facto by apply_ratio and the rest of FactoConfig, from
    `facto`; few-bit derivative codes for activations; the fixed-rate store for depthwise and grouped
    convs, squeeze-excite products, layer and group norms), and error-bounded compression for every
    layer it leaves as it is: the input layer, layers beyond apply_ratio, sigmoid and tanh (with
    store_bits=None, the store's layers too). Conv and linear layers get COMET's adaptive bound
    (`sigma`, `every`); the other ops `eb` relative to each map's value range."""
    fallback = ErrorBounded(eb, relative=True, adaptive=True, sigma=sigma, every=every)
    return FactoConfig(fallback=fallback, **facto)


def auto_batch_norm(method: str) -> str:
    """The batch-norm mode "auto" means for --method: compile's default, except frozen statistics
    for row strips (a strip cannot normalize by the whole batch's statistics, so they would end
    the strips at the first batch-norm)."""
    return "freeze" if method == "rowstrips" else FactoConfig.batch_norm


def method_options(method: str, eps: float = 0.8, last: int = 4, eb: float = 0.02, sigma: float = 0.1,
                   strips: int = 8, strip_mode: str = "two_phase") -> dict[str, dict | MethodConfig | None]:
    """FactoConfig's `methods`, `fallback` and `row_strips` for the command line's --method: "facto"
    alone, "hosvd" / "svd" (eps) on the last `last` convs with Facto in front, "eb", Facto plus
    ErrorBounded for the rest (eb relative to each map's range, sigma for the adaptive bound), or
    "rowstrips", the local chain from the input run in `strips` strips (Facto by apply_ratio as
    ever: apply_ratio 0 for strips alone)."""
    if method not in METHOD_CHOICES:
        raise ValueError(f"method must be one of {METHOD_CHOICES}; got {method!r}")
    row_strips = RowStrips(strips, strip_mode) if method == "rowstrips" else None
    if method == "eb":
        return {"methods": {}, "fallback": facto_error_bounded(eb, sigma).fallback, "row_strips": None}
    methods = on_last_layers(method, eps, last) if method in ("hosvd", "svd") else {}
    return {"methods": methods, "fallback": None, "row_strips": row_strips}


def method_description(method: str, eps: float = 0.8, last: int = 4, eb: float = 0.02, sigma: float = 0.1,
                       strips: int = 8, strip_mode: str = "two_phase") -> str:
    """What --method adds to Facto, for the commands' headers ("" for Facto alone)."""
    if method == "facto":
        return ""
    if method == "eb":
        return f", ErrorBounded for the rest (eb {eb} x range, sigma {sigma})"
    if method == "rowstrips":
        return f", row strips from the input ({strips} strips, {strip_mode})"
    return f", {method} eps {eps} on the last {last} convs"
