"""Each facto op's behaviour under torch.autocast, decided explicitly.

A custom op is opaque to autocast: without a rule, its body runs with autocast still on in eager
mode (F.conv2d inside it casts to bf16) and with autocast off once torch.compile has traced it, so
eager, compiled and fake kernels would disagree. The rule here is that of the aten op each facto
op stands for:

- conv2d, linear, hosvd_conv2d, hosvd_linear, quantized_conv2d (autocast's lower-precision list,
  like F.conv2d / F.linear): the input x is cast to the autocast dtype (bf16 or fp16, whichever
  torch.autocast asks for) and the op runs in it. The op itself casts W + M·D (formed in the
  parameters' precision), D and the bias to x's dtype (the hosvd ops and quantized_conv2d: W and
  the bias).
- relu, max_pool2d, dropout, scale, batch_norm, batch_norm_stats (on no autocast list): no cast;
  they run in their input's dtype, their parameters (s, γ, β, running statistics) stay fp32, and
  the output takes x's dtype.
- quantized_layer_norm, quantized_group_norm (like F.layer_norm / F.group_norm, on CUDA autocast's
  fp32 list and on no CPU list): on CUDA every floating tensor argument is cast to fp32 and the
  output is fp32; on the CPU nothing is cast.

Every op's output dtype is therefore its input x's dtype (fp32 for the norms under CUDA autocast),
on every path and in every fake.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOWER_PRECISION_OPS = ("conv2d", "linear", "hosvd_conv2d", "hosvd_linear", "quantized_conv2d")
FP32_OPS = ("quantized_layer_norm", "quantized_group_norm")
FP32_DEVICES = ("cuda",)  # where torch's autocast runs layer and group norm in fp32 (CPU's does not)
DEVICES = ("cpu", "cuda")

_lib = torch.library.Library("facto", "IMPL")


def _autocast_key(device_type: str) -> str:
    return "Autocast" + torch._C._dispatch_key_for_device(device_type)


def _cast_kernel(name: str, device_type: str, cast):
    """The op's autocast kernel: `cast` its arguments, then run the op below autocast."""
    op = getattr(torch.ops.facto, name).default
    key = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, _autocast_key(device_type)))

    def kernel(_keyset, *args):
        with torch._C._ExcludeDispatchKeyGuard(key):
            return op(*cast(args))

    return kernel


def _lower_precision(device_type: str):
    """x (the first argument) to autocast's dtype, where it is a floating tensor on the device."""
    def cast(args: tuple) -> tuple:
        x, *rest = args
        if x.is_floating_point() and x.device.type == device_type and x.dtype != torch.float64:
            x = x.to(torch.get_autocast_dtype(device_type))
        return (x, *rest)

    return cast


def _fp32(args: tuple) -> tuple:
    """Every floating tensor argument (float64 aside) to fp32."""
    return tuple(a.float() if isinstance(a, Tensor) and a.is_floating_point() and a.dtype != torch.float64 else a
                 for a in args)


def register() -> None:
    """Install the cast rules (lower-precision ops, fp32 ops) on every device autocast supports."""
    for device_type in DEVICES:
        if not torch._C._is_autocast_available(device_type):
            continue
        for name in LOWER_PRECISION_OPS:
            _lib.impl(name, _cast_kernel(name, device_type, _lower_precision(device_type)), _autocast_key(device_type),
                      with_keyset=True)
        for name in FP32_OPS if device_type in FP32_DEVICES else ():
            _lib.impl(name, _cast_kernel(name, device_type, _fp32), _autocast_key(device_type), with_keyset=True)
