"""Named combinations of methods, as FactoConfigs to pass to `facto_fx.compile(model, config)`."""

from __future__ import annotations

from facto_fx.config import FactoConfig
from facto_fx.methods import ErrorBounded


def facto_error_bounded(eb: float = 0.02, sigma: float = 0.1, every: int = 100, **facto: object) -> FactoConfig:
    """Facto where it applies (apply_ratio and the rest of FactoConfig, from `facto`), and
    error-bounded compression for every layer it leaves as it is: depthwise and grouped convs,
    SiLU / GELU / Hardswish / sigmoid, layer and group norm, squeeze-excite products, the input
    layer, layers beyond apply_ratio. Conv and linear layers get COMET's adaptive bound (`sigma`,
    `every`); the other ops `eb` relative to each map's value range."""
    fallback = ErrorBounded(eb, relative=True, adaptive=True, sigma=sigma, every=every)
    return FactoConfig(fallback=fallback, **facto)
