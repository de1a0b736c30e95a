"""Memory-saving methods, chosen per layer by `facto_fx.compile(..., methods={...})`.

Each method is a frozen config plus a registered handler (docs/design.md §6); importing this
package registers the built-in ones.
"""

from facto_fx.methods.base import (
    Last,
    Method,
    MethodConfig,
    PlanContext,
    RewriteSite,
    StepOptions,
    layer_handler,
    method_handler,
    method_layers,
    method_notes,
    method_parameters,
    register_method,
)
from facto_fx.methods.error_bounded import ErrorBounded
from facto_fx.methods.facto import FactoLowRank, layer_seed
from facto_fx.methods.fewbit import FewBitActivation
from facto_fx.methods.fixed_rate import FixedRate
from facto_fx.methods.frozen import FrozenBatchNorm
from facto_fx.methods.hosvd import HOSVD, SVD
from facto_fx.methods.masks import PackedMasks
from facto_fx.methods.row_strips import RowStrips

__all__ = [
    "HOSVD",
    "SVD",
    "ErrorBounded",
    "FactoLowRank",
    "FewBitActivation",
    "FixedRate",
    "FrozenBatchNorm",
    "Last",
    "Method",
    "MethodConfig",
    "PackedMasks",
    "PlanContext",
    "RowStrips",
    "RewriteSite",
    "StepOptions",
    "layer_handler",
    "layer_seed",
    "method_handler",
    "method_layers",
    "method_notes",
    "method_parameters",
    "register_method",
]
