"""Throughput of the error-bounded codec (compress and decompress, MB/s of the dense map) and its
compression ratio, on feature maps of a real network.

    python benchmarks/eb_codec.py              # CPU: the PyTorch codec
    python benchmarks/eb_codec.py --device cuda   # GPU: the Triton kernels (the issue asks >= 100 GB/s on an H100)

The maps are the inputs of torchvision resnet18's convs (pretrained weights are not downloaded:
the network is trained for a few steps on random data first, so its maps have the sparsity and
scale of a network in training), batch 8, 112², fp32; eb is relative to each map's value range.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision

from facto_fx.ops import eb_codec
from facto_fx.triton_ops.dispatch import use_triton


def conv_inputs(batch_size: int, image_size: int, device: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).to(device)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), torch.randint(0, 10, (batch_size,), device=device)).backward()
        optimizer.step()
    maps = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: maps.append(args[0].detach()))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return maps


def timed(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--relative", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    maps = conv_inputs(args.batch_size, args.image_size, args.device)
    if use_triton(maps[0]):
        from facto_fx.triton_ops import eb_codec as codec
    else:
        codec = eb_codec
    dense = sum(m.numel() * m.element_size() for m in maps)
    ebs = [args.relative * (m.max() - m.min()).item() for m in maps]
    codes = [codec.compress(m, eb) for m, eb in zip(maps, ebs, strict=True)]
    kept = sum(c.nbytes for c in codes)

    def compress_all() -> None:
        for m, eb in zip(maps, ebs, strict=True):
            codec.compress(m, eb)

    def decompress_all() -> None:
        for m, c, eb in zip(maps, codes, ebs, strict=True):
            codec.decompress(c, m.shape, m.dtype, eb)

    seconds = {"compress": timed(compress_all, args.repeats, args.device),
               "decompress": timed(decompress_all, args.repeats, args.device)}
    result = {name: dense / s / 1e6 for name, s in seconds.items()} | {"ratio": dense / kept}
    print(f"{len(maps)} resnet18 conv inputs, {dense / 2**20:.1f} MiB fp32, eb {args.relative:g} x range, "
          f"{codec.__name__} on {args.device} ({torch.get_num_threads()} threads): ratio {result['ratio']:.1f}x, "
          f"compress {result['compress']:.0f} MB/s, decompress {result['decompress']:.0f} MB/s")
    return result


if __name__ == "__main__":
    main()
