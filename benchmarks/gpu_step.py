"""GPU training step, vanilla vs Facto: time, peak memory, and the largest batch a budget holds.

    python benchmarks/gpu_step.py                       # vgg16 and resnet50, batch 64, 224x224
    python benchmarks/gpu_step.py --models vgg16 --dtypes bf16 --budget-gib 16

For each model and dtype (fp32, or bf16 autocast) it times a whole SGD step (forward, backward,
optimizer) with CUDA events after a warmup, and reads torch.cuda.max_memory_allocated, for vanilla
eager, vanilla torch.compile, Facto and Facto + torch.compile. Then it searches the largest batch
that fits `--budget-gib` (doubling, then bisection, catching out-of-memory) for vanilla and Facto.
The last lines compare against the targets: Facto step <= 0.8x vanilla eager (vgg16, batch 64),
peak <= 35 % of vanilla eager, largest batch >= 4x.

Under bf16 autocast the Facto conv / linear ops get autocast rules that cast their inputs to bf16,
as autocast does for aten's conv and linear, so compiled graphs see the dtypes they will get.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torchvision

import facto_fx

VARIANTS = ("vanilla", "vanilla+compile", "facto", "facto+compile")
TARGET_STEP, TARGET_PEAK, TARGET_BATCH = 0.8, 0.35, 4.0


@dataclass
class Measurement:
    model: str
    dtype: str
    variant: str
    step_ms: float
    peak_mib: float


def build(name: str, variant: str, args) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A fresh model of `variant` on the GPU and an SGD optimizer over its trainable parameters."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=1000).cuda()
    if variant.startswith("facto"):
        model = facto_fx.compile(model, inr=args.inr, lossy_kernel=args.lossy_kernel, apply_ratio=args.apply_ratio)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    if variant.startswith("facto"):
        facto_fx.attach(model, opt, merge_every=10_000)
    if variant.endswith("+compile"):
        model = torch.compile(model)
    return model, opt


def make_step(model, opt, batch_size: int, dtype: str, image_size: int) -> Callable[[], None]:
    x = torch.randn(batch_size, 3, image_size, image_size, device="cuda")
    target = torch.randint(0, 1000, (batch_size,), device="cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()

    return step


def release() -> None:
    torch._dynamo.reset()  # compiled graphs hold on to their buffers
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def measure(name: str, dtype: str, variant: str, args) -> Measurement:
    model, opt = build(name, variant, args)
    step = make_step(model, opt, args.batch_size, dtype, args.image_size)
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    peak = torch.cuda.max_memory_allocated() / 2**20
    del model, opt, step
    release()
    return Measurement(name, dtype, variant, statistics.median(times), peak)


def fits(name: str, variant: str, batch_size: int, dtype: str, args) -> bool:
    """Whether two steps at `batch_size` run within the memory budget."""
    try:
        model, opt = build(name, variant, args)
        step = make_step(model, opt, batch_size, dtype, args.image_size)
        step()
        step()
        torch.cuda.synchronize()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        model = opt = step = None
        release()


def largest_batch(name: str, variant: str, dtype: str, args) -> int:
    """Doubling until out of memory, then bisection to a multiple of --batch-granularity."""
    grain = args.batch_granularity
    low, high = 0, grain
    while fits(name, variant, high, dtype, args):
        low, high = high, high * 2
    while high - low > grain:
        middle = (low + high) // 2 // grain * grain
        low, high = (middle, high) if fits(name, variant, middle, dtype, args) else (low, middle)
    return low


def register_bf16_autocast() -> None:
    for op in ("facto::conv2d", "facto::linear"):
        torch.library.register_autocast(op, "cuda", torch.bfloat16)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet50"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--inr", type=float, default=0.3)
    parser.add_argument("--lossy-kernel", type=int, default=2)
    parser.add_argument("--apply-ratio", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--budget-gib", type=float, default=16.0, help="memory budget of the largest-batch search")
    parser.add_argument("--batch-granularity", type=int, default=8)
    parser.add_argument("--largest-batch-dtype", default="fp32", choices=["fp32", "bf16", "none"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_step.py needs a CUDA GPU and none is visible; use benchmarks/cpu_step.py on this machine")
    if "bf16" in args.dtypes or args.largest_batch_dtype == "bf16":
        register_bf16_autocast()
    torch.backends.cudnn.benchmark = True

    results = [measure(m, d, v, args) for m in args.models for d in args.dtypes for v in args.variants]
    print(f"\n{torch.cuda.get_device_name()}, batch {args.batch_size}, {args.image_size}x{args.image_size}")
    print(f"{'model':<10}{'dtype':<6}{'variant':<17}{'step ms':>9}{'peak MiB':>10}{'step/van':>10}{'peak/van':>10}")
    base = {(r.model, r.dtype): r for r in results if r.variant == "vanilla"}
    for r in results:
        ref = base.get((r.model, r.dtype))
        step_ratio = f"{r.step_ms / ref.step_ms:.3f}" if ref else "-"
        peak_ratio = f"{r.peak_mib / ref.peak_mib:.3f}" if ref else "-"
        print(f"{r.model:<10}{r.dtype:<6}{r.variant:<17}{r.step_ms:>9.1f}{r.peak_mib:>10.0f}{step_ratio:>10}{peak_ratio:>10}")

    batches = {}
    if args.largest_batch_dtype != "none":
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, args.budget_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)
        )
        for m in args.models:
            for v in ("vanilla", "facto"):
                batches[m, v] = largest_batch(m, v, args.largest_batch_dtype, args)
        torch.cuda.set_per_process_memory_fraction(1.0)
        print(f"\nlargest batch within {args.budget_gib:g} GiB ({args.largest_batch_dtype}):")
        for m in args.models:
            print(f"  {m:<10} vanilla {batches[m, 'vanilla']:>6}   facto {batches[m, 'facto']:>6}   "
                  f"facto / vanilla = {batches[m, 'facto'] / max(batches[m, 'vanilla'], 1):.2f}")

    print("\ntargets:")
    for (m, d), ref in base.items():
        facto = next((r for r in results if (r.model, r.dtype, r.variant) == (m, d, "facto")), None)
        if facto is None:
            continue
        step_ratio, peak_ratio = facto.step_ms / ref.step_ms, facto.peak_mib / ref.peak_mib
        print(f"  {m} {d}: step {step_ratio:.3f} (target <= {TARGET_STEP}: {_verdict(step_ratio <= TARGET_STEP)}), "
              f"peak {peak_ratio:.3f} (target <= {TARGET_PEAK}: {_verdict(peak_ratio <= TARGET_PEAK)})")
    for m in args.models:
        if (m, "facto") in batches:
            ratio = batches[m, "facto"] / max(batches[m, "vanilla"], 1)
            print(f"  {m}: largest batch x{ratio:.2f} (target >= {TARGET_BATCH}: {_verdict(ratio >= TARGET_BATCH)})")
    return {"steps": results, "largest_batch": batches}


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


if __name__ == "__main__":
    main()
