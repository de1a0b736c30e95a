"""facto_fx: Facto-CNN (low-rank training + lossy feature-map compression) as a torch.fx pass."""

from facto_fx import dynamo_backend, methods, ops
from facto_fx.api import (
    FactoSavesLittleWarning,
    FactoState,
    attach,
    compile,
    decisions,
    export_dense,
    facto_model,
    load_method_state,
    method_state,
    method_summaries,
    report,
)
from facto_fx.calibration import recalibrate_batch_norm
from facto_fx.config import FactoConfig
from facto_fx.dynamo_backend import facto_backend
from facto_fx.inspection import GraphInspection, inspect
from facto_fx.memory import saved_bytes_by_node
from facto_fx.methods import (
    HOSVD,
    SVD,
    ErrorBounded,
    FactoLowRank,
    FewBitActivation,
    FixedRate,
    FrozenBatchNorm,
    Last,
    Method,
    MethodConfig,
    PackedMasks,
    RowStrips,
    method_parameters,
    register_method,
)
from facto_fx.methods.hosvd import rank_table
from facto_fx.passes.hooks import FactoHooks
from facto_fx.passes.trace import FactoTraceError
from facto_fx.passes.verify import FactoVerificationError
from facto_fx.report import MemoryReport
from facto_fx.triton_ops.dispatch import use_kernels

# The name from before there were other methods: Facto's M are what most models' methods add.
low_rank_parameters = method_parameters

__all__ = [
    "HOSVD",
    "SVD",
    "ErrorBounded",
    "RowStrips",
    "FactoConfig",
    "FactoLowRank",
    "FewBitActivation",
    "FixedRate",
    "FrozenBatchNorm",
    "Last",
    "Method",
    "MethodConfig",
    "PackedMasks",
    "FactoHooks",
    "FactoSavesLittleWarning",
    "FactoState",
    "FactoTraceError",
    "FactoVerificationError",
    "GraphInspection",
    "MemoryReport",
    "attach",
    "compile",
    "decisions",
    "export_dense",
    "facto_backend",
    "facto_model",
    "load_method_state",
    "low_rank_parameters",
    "method_state",
    "method_summaries",
    "recalibrate_batch_norm",
    "inspect",
    "method_parameters",
    "methods",
    "ops",
    "rank_table",
    "register_method",
    "report",
    "saved_bytes_by_node",
    "use_kernels",
]
__version__ = "0.1.0"

dynamo_backend.register()
