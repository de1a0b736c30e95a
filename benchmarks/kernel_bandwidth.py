"""Achieved memory bandwidth of each Triton kernel, as a share of the GPU's copy bandwidth.

    python benchmarks/kernel_bandwidth.py                  # a VGG16-like 64x64x112x112 map
    python benchmarks/kernel_bandwidth.py --shape 64 128 56 56 --dtypes bf16

Each kernel is element-wise or a reduction, so its speed limit is memory traffic. Bytes moved
(what it must read and write, counted from the tensor sizes) over its time (triton.testing.do_bench,
median) gives GB/s; the copy bandwidth is measured with a torch clone of the kernel's main input.
The PyTorch path of the same op is timed beside it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Case:
    name: str
    bytes_moved: int
    triton: Callable[[], object]
    torch: Callable[[], object] | None  # the PyTorch path, where it is one call


def cases(
    shape: tuple[int, ...], dtype: torch.dtype, inr: float, k: int, device: str = "cuda"
) -> tuple[torch.Tensor, list[Case]]:
    """The main input map and one Case per kernel (device is an argument so the cases can be checked on CPU)."""
    from facto_fx.ops.bitpack import pack_bits, unpack_bits
    from facto_fx.ops.lossy import mean_pool, sum_pool
    from facto_fx.ops.max_pool import max_pool2d_fwd
    from facto_fx.triton_ops import affine, conv, dropout, max_pool, relu
    from facto_fx.triton_ops.dispatch import use_kernels

    batch, channels, height, width = shape
    x = torch.randn(shape, device=device, dtype=dtype)
    g = torch.randn_like(x)
    n, e = x.numel(), x.element_size()
    bits = n // 8
    mask = pack_bits(x > 0, 1)
    y2, code2 = max_pool.max_pool_forward(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    y3, code3 = max_pool.max_pool_forward(x, [3, 3], [2, 2], [1, 1], [1, 1], False)
    g2, g3 = torch.randn_like(y2), torch.randn_like(y3)
    stats = [torch.randn(channels, device=device) for _ in range(4)]
    stats[1] = stats[1].abs() + 0.5
    _, pooled = affine.affine_forward(x, channels, k, None, True, *stats)
    rank = max(1, round(inr * channels))
    z_p = torch.randn(batch, rank, *pooled.shape[-2:], device=device, dtype=dtype)

    def torch_path(fn):
        def run():
            with use_kernels("torch"):
                return fn()
        return run

    def bn_torch():
        x_hat = (x - stats[0].view(1, -1, 1, 1)) * stats[1].view(1, -1, 1, 1)
        return x_hat * stats[2].view(1, -1, 1, 1) + stats[3].view(1, -1, 1, 1), mean_pool(x_hat, k)

    def bn_backward_torch():
        grad_p = sum_pool(g, k)
        return g * stats[1].view(1, -1, 1, 1), (grad_p * pooled).sum((0, 2, 3)), g.sum((0, 2, 3))

    return x, [
        Case("relu forward", 2 * n * e + bits, lambda: relu.relu_forward(x),
             lambda: (torch.relu(x), pack_bits(x > 0, 1))),
        Case("relu backward", 2 * n * e + bits, lambda: relu.relu_backward(g, mask),
             lambda: g * unpack_bits(mask, 1, n).view(g.shape)),
        Case("dropout forward (incl. rand)", 4 * n * e + bits, lambda: dropout.dropout_forward(x, 0.5),
             lambda: (lambda keep: (x * keep / 0.5, pack_bits(keep, 1)))(torch.rand_like(x) >= 0.5)),
        Case("dropout backward", 2 * n * e + bits, lambda: dropout.dropout_backward(g, mask, 0.5),
             lambda: g * unpack_bits(mask, 1, n).view(g.shape) / 0.5),
        Case("max_pool 2x2/2 forward", n * e + y2.numel() * e + code2.numel(),
             lambda: max_pool.max_pool_forward(x, [2, 2], [2, 2], [0, 0], [1, 1], False),
             torch_path(lambda: max_pool2d_fwd(x, [2, 2], [2, 2], [0, 0], [1, 1], False))),
        Case("max_pool 2x2/2 backward", n * e + g2.numel() * e + code2.numel(),
             lambda: max_pool.max_pool_backward(g2, code2, x.shape, [2, 2], [2, 2], [0, 0], [1, 1]), None),
        Case("max_pool 3x3/2 forward", n * e + y3.numel() * e + code3.numel(),
             lambda: max_pool.max_pool_forward(x, [3, 3], [2, 2], [1, 1], [1, 1], False),
             torch_path(lambda: max_pool2d_fwd(x, [3, 3], [2, 2], [1, 1], [1, 1], False))),
        Case("max_pool 3x3/2 backward", n * e + g3.numel() * e + code3.numel(),
             lambda: max_pool.max_pool_backward(g3, code3, x.shape, [3, 3], [2, 2], [1, 1], [1, 1]), None),
        Case(f"batch-norm + meanpool{k} forward", 2 * n * e + pooled.numel() * e,
             lambda: affine.affine_forward(x, channels, k, None, True, *stats), bn_torch),
        Case(f"batch-norm + sumpool{k} backward", 2 * n * e + pooled.numel() * e,
             lambda: affine.affine_backward(g, pooled, stats[1], channels, k, (True, True, True)), bn_backward_torch),
        Case(f"conv grad_M (C_R={rank})", n * e + z_p.numel() * e, lambda: conv.grad_m(g, z_p, k),
             lambda: torch.einsum("bohw,brhw->or", sum_pool(g, k), z_p)),
    ]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs=4, type=int, default=[64, 64, 112, 112], metavar=("B", "C", "H", "W"))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--inr", type=float, default=0.3)
    parser.add_argument("--lossy-kernel", type=int, default=2)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("kernel_bandwidth.py needs a CUDA GPU and none is visible")
    from triton.testing import do_bench

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    rows = []
    print(f"{torch.cuda.get_device_name()}, map {tuple(args.shape)}")
    print(f"{'kernel':<32}{'dtype':<6}{'MB':>8}{'ms':>9}{'GB/s':>8}{'% copy':>8}{'torch ms':>10}")
    for name in args.dtypes:
        x, kernel_cases = cases(tuple(args.shape), dtypes[name], args.inr, args.lossy_kernel)
        copy_ms = do_bench(lambda: x.clone())  # noqa: B023 - timed right here
        copy_gbs = 2 * x.numel() * x.element_size() / copy_ms / 1e6
        for case in kernel_cases:
            ms = do_bench(case.triton)
            torch_ms = do_bench(case.torch) if case.torch else float("nan")
            gbs = case.bytes_moved / ms / 1e6
            rows.append({"kernel": case.name, "dtype": name, "ms": ms, "gb_s": gbs, "share": gbs / copy_gbs})
            print(f"{case.name:<32}{name:<6}{case.bytes_moved / 1e6:>8.0f}{ms:>9.3f}{gbs:>8.0f}"
                  f"{100 * gbs / copy_gbs:>7.0f}%{torch_ms:>10.3f}")
        print(f"{'copy (torch clone)':<32}{name:<6}{2 * x.numel() * x.element_size() / 1e6:>8.0f}{copy_ms:>9.3f}"
              f"{copy_gbs:>8.0f}{100:>7.0f}%")
    return rows


if __name__ == "__main__":
    main()
