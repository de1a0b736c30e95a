"""Facto operators: torch.library custom ops in the "facto" namespace, pure PyTorch.

Each module declares one op with its fake (meta) kernel and autograd formula, plus a Python
wrapper that falls back to the plain op when no gradient is needed. `autocast` holds their
autocast policy.
"""

from facto_fx.ops import autocast
from facto_fx.ops.batch_norm import batch_norm, batch_norm_in_mode, batch_norm_stats
from facto_fx.ops.conv import conv2d, delta_weight, merged_weight, projection_filter
from facto_fx.ops.dropout import dropout
from facto_fx.ops.error_bound import ErrorBound
from facto_fx.ops.error_bounded import CompressedFunction, compressed_call
from facto_fx.ops.fewbit import fewbit_activation
from facto_fx.ops.hosvd import conv_padding, decompose, hosvd_conv2d, hosvd_linear, rank_report, reconstruct
from facto_fx.ops.linear import linear
from facto_fx.ops.max_pool import max_pool2d
from facto_fx.ops.quantized import QuantizedMap, quantized_conv2d, quantized_mul
from facto_fx.ops.quantized_norm import quantized_group_norm, quantized_layer_norm
from facto_fx.ops.relu import relu
from facto_fx.ops.scale import scale

autocast.register()

__all__ = [
    "CompressedFunction", "ErrorBound", "batch_norm", "batch_norm_in_mode", "batch_norm_stats", "compressed_call",
    "conv2d", "conv_padding", "decompose", "delta_weight", "dropout", "fewbit_activation", "hosvd_conv2d",
    "hosvd_linear", "linear", "max_pool2d", "merged_weight", "projection_filter", "QuantizedMap", "quantized_conv2d",
    "quantized_group_norm", "quantized_layer_norm", "quantized_mul", "rank_report", "reconstruct", "relu", "scale",
]
