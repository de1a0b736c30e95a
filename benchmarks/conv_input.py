"""A convolution's input gradient: torch.nn.grad.conv2d_input vs facto_fx.ops.conv_input.conv2d_input.

    python benchmarks/conv_input.py

Every Facto convolution computes grad_X this way in backward (its input is not kept). torch's
function copies a stand-in input expanded from one element before its kernel runs; facto's runs the
transposed convolution (ResNet's strided 1×1 downsample in NCHW: the subsampled grid's). Each shape
is measured both ways in turn, in NCHW and channels_last, after checking the two agree: the time
(the fastest of the repeats) and the peak while it runs (the allocator's events), both against the
input's size.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch

from facto_fx.memory import peak_step_bytes
from facto_fx.ops.conv_input import conv2d_input

# (batch, in channels, out channels, input size, kernel, stride, groups), and where each comes from.
SHAPES = {
    "resnet50 downsample": (8, 256, 512, 56, 1, 2, 1),
    "resnet50 downsample, late": (8, 1024, 2048, 14, 1, 2, 1),
    "resnet18 3×3": (8, 64, 64, 56, 3, 1, 1),
    "mobilenetv4 stage 0, 3×3 s2": (8, 32, 32, 80, 3, 2, 1),
    "efficientnet depthwise 3×3": (8, 96, 96, 40, 3, 1, 96),
    "efficientnet pointwise": (8, 240, 40, 20, 1, 1, 1),
    "efficientnet pointwise, wide map": (8, 40, 240, 40, 1, 1, 1),
}


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` calls after a warm-up, waiting for CUDA's queued work in each."""
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    rows = []
    print(f"convolution input gradient, {args.device}, {torch.get_num_threads()} threads; "
          "peaks as multiples of the input's size")
    for layout in (torch.contiguous_format, torch.channels_last):
        for name, (batch, c_in, c_out, size, kernel, stride, groups) in SHAPES.items():
            x_shape, padding = (batch, c_in, size, size), kernel // 2
            weight = torch.randn(c_out, c_in // groups, kernel, kernel, device=args.device)
            out = (size + 2 * padding - kernel) // stride + 1
            grad_y = torch.randn(batch, c_out, out, out, device=args.device).contiguous(memory_format=layout)
            conv_args = (stride, padding, 1, groups)
            torch.testing.assert_close(conv2d_input(x_shape, weight, grad_y, *conv_args),
                                       torch.nn.grad.conv2d_input(x_shape, weight, grad_y, *conv_args),
                                       rtol=1e-4, atol=1e-3)  # sums of up to 2048 fp32 products
            ours = lambda: conv2d_input(x_shape, weight, grad_y, *conv_args)  # noqa: B023, E731
            torchs = lambda: torch.nn.grad.conv2d_input(x_shape, weight, grad_y, *conv_args)  # noqa: B023, E731
            x_bytes = 4 * batch * c_in * size * size
            row = {"torch_ms": best_ms(torchs, args.repeats), "facto_ms": best_ms(ours, args.repeats),
                   "torch_peak": peak_step_bytes(torchs, args.device) / x_bytes,
                   "facto_peak": peak_step_bytes(ours, args.device) / x_bytes}
            rows.append(row)
            print(f"  {'NHWC' if layout == torch.channels_last else 'NCHW'} {name:<28} "
                  f"time torch {row['torch_ms']:7.2f} ms, facto {row['facto_ms']:7.2f} ms "
                  f"({row['torch_ms'] / row['facto_ms']:.1f}x); "
                  f"peak torch {row['torch_peak']:.2f}, facto {row['facto_peak']:.2f}")
    return rows


if __name__ == "__main__":
    main()
