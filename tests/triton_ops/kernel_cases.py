"""Shared inputs for the Triton kernel tests: small (the interpreter is slow), odd-sized, in
every supported dtype, and as non-contiguous views."""

from __future__ import annotations

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def noncontiguous(shape, dtype, seed=0) -> torch.Tensor:
    """A transposed view with the given shape: its strides differ from a contiguous tensor's."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g).to(dtype)
    return base.transpose(-1, -2)


def randn(shape, dtype, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def distinct(shape, dtype, seed=0) -> torch.Tensor:
    """Values without ties, exact in bf16 (at most 256 of them), so every argmax is unambiguous."""
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    assert n <= 256, "bf16 holds the integers 0..256 exactly, no more"
    return (torch.randperm(n, generator=g) - n // 2).to(dtype).view(shape)


def tolerance(dtype) -> dict:
    """assert_close tolerances for a result rounded once to `dtype` after fp32 arithmetic."""
    return {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}.get(
        dtype, dict(rtol=1.6e-2, atol=1.6e-2)
    )
