"""Input gradient of ResNet's strided 1×1 downsample convolutions: torch's kernel vs facto's path.

    python benchmarks/conv_input.py

facto_fx.ops.conv_input.conv2d_input computes a strided 1×1 convolution's input gradient as the
stride-1 gradient of the subsampled grid, written into a zero map. Each shape is timed both ways in
turn (the minimum of the repeats), after checking the two agree.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch

from facto_fx.ops.conv_input import conv2d_input

# (batch, in channels, out channels, input height): torchvision resnet18 at 128² and resnet50 at 224².
SHAPES = [(8, 64, 128, 32), (8, 128, 256, 16), (8, 256, 512, 8), (8, 256, 512, 56), (8, 1024, 2048, 14)]


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
    print(f"strided 1x1 input gradient, stride 2, {args.device}, {torch.get_num_threads()} threads")
    for batch, c_in, c_out, size in SHAPES:
        x_shape = (batch, c_in, size, size)
        weight = torch.randn(c_out, c_in, 1, 1, device=args.device)
        grad_y = torch.randn(batch, c_out, size // 2, size // 2, device=args.device)
        torch.testing.assert_close(conv2d_input(x_shape, weight, grad_y, 2, 0, 1),
                                   torch.nn.grad.conv2d_input(x_shape, weight, grad_y, 2, 0, 1),
                                   rtol=1e-4, atol=1e-3)  # sums of up to 2048 fp32 products
        ours = best_ms(lambda: conv2d_input(x_shape, weight, grad_y, 2, 0, 1), args.repeats)  # noqa: B023
        torchs = best_ms(lambda: torch.nn.grad.conv2d_input(x_shape, weight, grad_y, 2, 0, 1), args.repeats)  # noqa: B023
        rows.append({"torch_ms": torchs, "facto_ms": ours})
        print(f"  {str(x_shape):<22} -> {c_out:4d}: torch {torchs:8.2f} ms, facto {ours:8.2f} ms, "
              f"torch / facto = {torchs / ours:.1f}")
    return rows


if __name__ == "__main__":
    main()
