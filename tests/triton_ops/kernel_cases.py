"""Shared inputs and helpers of the Triton kernel tests. Inputs are small (the interpreter is slow),
odd-sized, in every supported dtype, and also channels_last or non-contiguous views."""

from __future__ import annotations

import torch

import facto_fx

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


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x as a "contiguous" or "channels_last" tensor."""
    return channels_last(x) if layout == "channels_last" else x.contiguous()


def run_op(op, x, *args, kernels: str, grad_y: torch.Tensor, seed: int = 0):
    """(y, saved map, grads) of a facto op on `x` under `kernels`, seeded, with backward from grad_y.

    The grads are those of x and of the tensor arguments that require one, in order.
    """
    params = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.requires_grad else a
              for a in args]
    leaves = [x.detach().requires_grad_(), *params]  # x's own storage, so a spy can tell it was not copied
    torch.manual_seed(seed)
    with facto_fx.use_kernels(kernels):
        y, saved, *_ = op(*leaves)  # (batch-norm's codes' statistics follow)
        y.backward(grad_y)
    return y.detach(), saved, [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]


class KernelSpy:
    """Stands in for a Triton kernel (`kernel[grid](*args)`) and records the arguments of each launch."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, []

    @classmethod
    def install(cls, monkeypatch, module, name: str) -> KernelSpy:
        spy = cls(getattr(module, name))
        monkeypatch.setattr(module, name, spy)
        return spy

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(args)
            return self.kernel[grid](*args, **kwargs)

        return launch

    def read_in_place(self, t: torch.Tensor) -> bool:
        """Whether every launch was given `t` itself (same storage and strides), not a copy of it."""
        def same(a):
            return isinstance(a, torch.Tensor) and a.data_ptr() == t.data_ptr() and a.stride() == t.stride()

        return bool(self.launches) and all(any(same(a) for a in args) for args in self.launches)
