"""Which implementation a Facto op runs: the Triton kernels or the pure-PyTorch reference.

The choice is context-local (`use_kernels`), read by each op when it runs and kept in its autograd
context, so the backward of a call uses the same family as its forward. Nothing here imports
triton: a machine without it still runs the PyTorch path.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import Literal, get_args

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

Kernels = Literal["auto", "triton", "torch"]
KERNEL_CHOICES: tuple[str, ...] = get_args(Kernels)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_MODE: ContextVar[str] = ContextVar("facto_kernels", default="auto")


def check_mode(mode: object) -> str:
    if mode not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}; got {mode!r}")
    return mode


def current_mode() -> str:
    return _MODE.get()


@contextmanager
def use_kernels(mode: Kernels) -> Iterator[None]:
    """Run Facto ops inside the block with `mode`: "auto" (Triton on CUDA), "triton" or "torch"."""
    token = _MODE.set(check_mode(mode))
    try:
        yield
    finally:
        _MODE.reset(token)


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1 runs kernels on CPU tensors (it must be set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(x: Tensor, mode: str | None = None) -> bool:
    """Whether an op on `x` runs its Triton kernel under `mode` (the current mode by default).

    Fake tensors (torch.compile tracing a backward formula) always take the PyTorch path: the
    compiler fuses it itself, and a kernel cannot be launched on them. Under "auto", so do tensors
    that are neither contiguous nor channels_last: the kernels index those two layouts in memory
    order, and would first copy any other.
    """
    mode = mode or _MODE.get()
    if mode == "torch" or is_fake(x):
        return False
    if mode == "auto":
        dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
        return x.is_cuda and x.dtype in TRITON_DTYPES and dense and triton_importable()
    if not triton_importable():
        raise RuntimeError("kernels='triton' but triton cannot be imported; install triton or use kernels='auto'")
    if x.dtype not in TRITON_DTYPES:
        raise RuntimeError(
            f"kernels='triton' has no kernel for {x.dtype} tensors; use kernels='auto' (PyTorch for them)"
        )
    if not (x.is_cuda or interpreter_enabled()):
        raise RuntimeError(
            f"kernels='triton' needs CUDA tensors, but this one is on {x.device}: move the model and its inputs "
            "to CUDA, use kernels='auto' or 'torch', or set TRITON_INTERPRET=1 before importing triton"
        )
    return True


class KernelScope:
    """Forward hooks that run a module under one kernel mode, restored even if forward raises.

    The hooks are skipped by torch.compile's tracer (not traced, no graph break), so a compiled
    model still runs its ops under the mode.
    """

    def __init__(self, mode: Kernels) -> None:
        self.mode = check_mode(mode)
        self.tokens: list[Token] = []

    @torch.compiler.disable(recursive=False)
    def enter(self, module: nn.Module, args) -> None:
        self.tokens.append(_MODE.set(self.mode))

    @torch.compiler.disable(recursive=False)
    def exit(self, module: nn.Module, args, output) -> None:
        _MODE.reset(self.tokens.pop())

    def attach(self, module: nn.Module) -> None:
        module.register_forward_pre_hook(self.enter)
        module.register_forward_hook(self.exit, always_call=True)
