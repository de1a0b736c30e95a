"""Which real models facto_fx rewrites, and whether each still computes the original function.

    python benchmarks/compatibility.py                   # every torchvision classifier + timm CNN families
    python benchmarks/compatibility.py --models timm:resnet18 resnet18 --out -   # a few, to stdout
    python benchmarks/compatibility.py --jobs 2            # two models at once (one thread each)

For each model (num_classes=10, random weights, batch 2): `facto_fx.compile(model, inr=0.3,
lossy_kernel=2, apply_ratio=1.0)`, then, independently of compile's own check, the output of the
Facto model against the original's, both in eval mode with gradients on, at M = 0; one training
step (forward + backward) of the Facto model; saved-for-backward bytes, vanilla vs Facto, from
`facto_fx.report`; and every method's gradients against an independent reference
(benchmarks/gradient_check.py). A model is "exact" at relative error <= 1e-5 with every gradient
check passed, "refused" when compile raises a FactoTraceError / FactoVerificationError (the reason
is listed), and "FAILED" otherwise: a failure is a bug in facto_fx. Writes a Markdown table
(docs/compatibility.md by default).
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from gradient_check import METHODS, check_gradients
from gradient_check import summary as gradient_summary
from torch import nn
from tqdm import tqdm

import facto_fx
from facto_fx.passes.verify import relative_error

EXACT = 1e-5
# The gradient checks hold two float64 copies of a model and their gradients (32 bytes a parameter)
# besides its maps: with --jobs, models over ONE_AT_A_TIME parameters run alone (two resnext101s at
# once exceeded 24 GiB), and models over GRADIENT_LIMIT are not checked on a 24 GiB machine.
ONE_AT_A_TIME = 80_000_000
GRADIENT_LIMIT = 250_000_000
TIMM_MODELS = (
    "resnet18", "resnet50", "resnet50d", "resnetv2_50", "regnetx_002", "regnety_016", "efficientnet_b0",
    "tf_efficientnet_b0", "efficientnetv2_rw_t", "tf_efficientnetv2_b0", "mobilenetv2_100", "mobilenetv3_large_100",
    "mobilenetv3_small_100", "mnasnet_100", "mixnet_s", "ghostnet_100", "rexnet_100", "lcnet_050", "densenet121",
    "dla34", "dpn68", "cspresnet50", "cspdarknet53", "cspresnext50", "darknet53", "repvgg_a2", "res2net50_26w_4s",
    "resnest14d", "skresnet18", "nf_resnet50", "dm_nfnet_f0", "convnext_atto", "vgg16", "inception_v3",
    "inception_v4", "legacy_xception", "xception41", "hrnet_w18_small", "ese_vovnet19b_dw", "selecsls42b",
    "nf_regnet_b0", "tresnet_m", "bat_resnext26ts",
)
# Models that only accept one input size (inception_v3's auxiliary head, run in training, needs 299).
FIXED_SIZE = {"vit": 224, "swin": 224, "maxvit": 224, "inception_v3": 299, "bat_resnext": 256}


@dataclass
class Row:
    model: str
    status: str
    error: float | None = None
    rewritten: int = 0
    frozen: int = 0
    dense: int = 0
    opaque: int = 0
    vanilla_mib: float | None = None
    facto_mib: float | None = None
    trains: str = "-"
    gradient: str = "-"
    seconds: float = 0.0
    note: str = ""


def default_models() -> list[str]:
    names = [f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models)]
    return names + [f"timm:{n}" for n in TIMM_MODELS]


def build(spec: str) -> nn.Module:
    source, _, name = spec.rpartition(":")
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10)
    return torchvision.models.get_model(name, weights=None, num_classes=10)


def parameters(spec: str) -> int:
    """The model's parameter count, from a build on the meta device (nothing allocated), or a real
    one where its constructor computes with tensors (torchvision's regnets)."""
    try:
        with torch.device("meta"):
            model = build(spec)
    except NotImplementedError:
        model = build(spec)
    return sum(p.numel() for p in model.parameters())


def _seeded_build(spec: str) -> nn.Module:
    torch.manual_seed(0)
    return build(spec)


def image_size(spec: str, default: int) -> int:
    name = spec.rpartition(":")[2]
    return next((size for prefix, size in FIXED_SIZE.items() if name.startswith(prefix)), default)


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]


def check(spec: str, size: int, batch: int = 2, gradient_methods: Sequence[str] = METHODS) -> Row:
    """One model through compile, the M = 0 comparison, a training step, the memory report and each
    method's gradient check (benchmarks/gradient_check.py)."""
    start = time.perf_counter()
    torch.manual_seed(0)
    model = build(spec)
    x = torch.randn(batch, 3, image_size(spec, size), image_size(spec, size))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fmodel = facto_fx.compile(model, inr=0.3, lossy_kernel=2, apply_ratio=1.0, example_inputs=(x,))
    except (facto_fx.FactoTraceError, facto_fx.FactoVerificationError) as error:
        return Row(spec, "refused", seconds=time.perf_counter() - start, note=_first_line(error))
    except Exception as error:
        return Row(spec, "FAILED", seconds=time.perf_counter() - start, note=f"compile: {_first_line(error)}")
    decisions = facto_fx.decisions(fmodel)
    row = Row(
        spec, "exact",
        rewritten=sum(d.rewritten and d.compress for d in decisions),
        frozen=sum(d.rewritten and not d.compress for d in decisions),
        dense=sum(d.unsupported for d in decisions),
        opaque=len(fmodel.meta["opaque_modules"]),
        note="compile warned: saves little" if any(w.category is facto_fx.FactoSavesLittleWarning for w in caught)
        else "",
    )
    try:
        model.eval(), fmodel.eval()
        with torch.no_grad():
            expected = model(x)
        with torch.enable_grad():
            actual = fmodel(x)
        row.error = relative_error(actual.detach(), expected)
        if row.error > EXACT:
            row.status = "FAILED"
            row.note = "differs from the original at M = 0"
        fmodel.train()
        outputs = fmodel(x)  # a namedtuple where training adds auxiliary logits (googlenet, inception_v3)
        sum(t.float().square().mean() for t in (outputs if isinstance(outputs, tuple) else (outputs,))).backward()
        grads = [p.grad for p in fmodel.parameters() if p.requires_grad]
        row.trains = "yes" if grads and all(g is not None and torch.isfinite(g).all() for g in grads) else "no"
        if row.trains == "no":
            row.status, row.note = "FAILED", "a trainable parameter got no or a non-finite gradient"
        fmodel.zero_grad(set_to_none=True)
        fmodel.eval()
        report = facto_fx.report(fmodel, x)
        row.vanilla_mib, row.facto_mib = report.vanilla_bytes / 2**20, report.facto_bytes / 2**20
    except Exception as error:
        row.status, row.note = "FAILED", f"after compile: {_first_line(error)}"
    count = parameters(spec) if gradient_methods else 0
    if count > GRADIENT_LIMIT:
        row.gradient = f"not checked: {count / 1e6:.0f} M parameters"
    elif gradient_methods:
        gradients = check_gradients(lambda: _seeded_build(spec), x, gradient_methods)
        row.gradient = gradient_summary(gradients)
        problems = [g.problem for g in gradients if not g.ok]
        if problems:
            row.status, row.note = "FAILED", "; ".join([row.note, *problems] if row.note else problems)
    row.seconds = time.perf_counter() - start
    return row


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def to_markdown(rows: Sequence[Row], size: int, not_run: Sequence[str] = ()) -> str:
    lines = [
        "# Model compatibility",
        "",
        f"Generated by `python benchmarks/compatibility.py` (torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, timm {_timm_version()}, {platform.machine()} CPU). Each model: random weights, "
        f"num_classes=10, batch 2 at {size}² (ViT / Swin / MaxViT at 224², inception_v3 at 299², bat_resnext at "
        "256²), `facto_fx.compile(model, inr=0.3, "
        "lossy_kernel=2, apply_ratio=1.0)`.",
        "",
        "- **status**: *exact* = the Facto model's output equals the original's at M = 0 (relative error "
        f"≤ {EXACT:g}, eval mode), a training step gives every trainable parameter a finite gradient and "
        "every gradient check below passes; "
        "*refused* = `compile` raised a clear error instead; *FAILED* = a bug.",
        "- **facto / frozen / dense / opaque**: layers rewritten to Facto operators, batch-norms frozen "
        "but not compressed, layers left dense with a reason (`facto_fx.decisions`), and of those the "
        "sub-modules kept as one opaque call (untraceable, hooked, or mode-dependent code).",
        "- **saved**: bytes autograd keeps for backward in one training forward (docs/design.md §5), vanilla "
        "eager training every weight vs Facto.",
        "- **gradients**: each method's largest relative gradient error against an independent reference, in "
        "float64, eval mode with gradients on (`benchmarks/gradient_check.py`): *facto* (lossy kernel 1, M ≠ 0) "
        "against plain autograd of a dense copy holding Ω = W + M·D (grad_M = grad_Ω·Dᵀ, every other parameter "
        "equal); *strips* (3 row strips) against the same Facto model unsplit; *hosvd* (eps = 1 on every conv "
        "and linear) against the dense model; *eb* (ErrorBounded on every op it takes, relative bound 1e-6) "
        "within 1e-3 over the whole model, unless saved values lie within the bound of an activation's kink "
        "(noted), where the bound allows an element's gradient either way. Lossless checks pass at 1e-6; *-*: "
        "the method takes no layer of the model. A wrong or non-finite gradient makes the model FAILED.",
        "",
        "| model | status | error at M = 0 | facto | frozen | dense | opaque | vanilla MiB | facto MiB "
        "| facto % | trains | gradients | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = _fmt(100 * r.facto_mib / r.vanilla_mib if r.vanilla_mib else None, ".1f")
        lines.append(
            f"| {r.model} | {r.status} | {_fmt(r.error, '.1e')} | {r.rewritten} | {r.frozen} | {r.dense} "
            f"| {r.opaque} | {_fmt(r.vanilla_mib, '.2f')} | {_fmt(r.facto_mib, '.2f')} | {share} | {r.trains} "
            f"| {r.gradient} | {r.note.replace('|', '/')} |"
        )
    counts = {s: sum(r.status == s for r in rows) for s in ("exact", "refused", "FAILED")}
    summary = f"{len(rows)} models: {counts['exact']} exact, {counts['refused']} refused, {counts['FAILED']} failed."
    shares = [r.facto_mib / r.vanilla_mib for r in rows if r.vanilla_mib]
    if shares:
        summary += f" Median saved bytes: {100 * statistics.median(shares):.1f} % of vanilla's."
    if not_run:
        summary += f" Not run yet ({len(not_run)}): {', '.join(not_run)}."
    lines += ["", summary]
    return "\n".join(lines) + "\n"


def _timm_version() -> str:
    try:
        import timm
    except ImportError:
        return "not installed"
    return timm.__version__


# A fresh worker per model (Python 3.11+): a worker's memory grows from model to model (two of them
# held 9 and 7 GiB after 50 models).
FRESH_WORKERS = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}


def _one_thread() -> None:
    torch.set_num_threads(1)


def _run(specs: Sequence[str], size: int, gradient_methods: Sequence[str], jobs: int,
         finished: Callable[[list[Row]], None]) -> list[Row]:
    """Every model's row, in `specs`' order, `jobs` at a time; a line per model as it finishes, and
    `finished` called with the rows so far (in `specs`' order)."""
    bar = tqdm(total=len(specs), desc="models", file=sys.stderr)
    by_spec: dict[str, Row] = {}

    def done(spec: str, row: Row) -> None:
        by_spec[spec] = row
        bar.update()
        bar.write(f"{row.model}: {row.status}, gradients {row.gradient}, {row.seconds:.0f} s {row.note}",
                  file=sys.stderr)
        finished([by_spec[s] for s in specs if s in by_spec])

    if jobs <= 1:
        for spec in specs:
            done(spec, check(spec, size, gradient_methods=gradient_methods))
            gc.collect()
        return [by_spec[spec] for spec in specs]
    large = {spec for spec in specs if parameters(spec) > ONE_AT_A_TIME}
    context = multiprocessing.get_context("spawn")  # a fresh torch per worker: fork after OpenMP can hang
    for batch, workers in (([s for s in specs if s not in large], jobs), ([s for s in specs if s in large], 1)):
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_one_thread, **FRESH_WORKERS) as pool:
            futures = {pool.submit(check, spec, size, gradient_methods=gradient_methods): spec for spec in batch}
            for future in as_completed(futures):
                done(futures[future], future.result())
    return [by_spec[spec] for spec in specs]


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="torchvision:NAME or timm:NAME (default: all)")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--out", default="docs/compatibility.md", help="Markdown file, or - for stdout")
    parser.add_argument("--gradient-methods", nargs="*", choices=METHODS, default=list(METHODS),
                        help="methods whose gradients each model checks (none: skip the gradient check)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="models checked at once, one process and one thread each (default: 1, all threads)")
    args = parser.parse_args(argv)
    specs = [m if ":" in m else f"torchvision:{m}" for m in args.models] if args.models else default_models()

    def write(rows: list[Row]) -> None:
        """The table of the rows so far: a sweep takes hours, and an interrupted one keeps its rows."""
        left = [spec for spec in specs if spec not in {r.model for r in rows}]
        text = to_markdown(rows, args.image_size, left)
        if args.out != "-":
            Path(args.out).write_text(text)
        elif not left:
            print(text)

    rows = _run(specs, args.image_size, args.gradient_methods, args.jobs, write)
    if args.out != "-":
        print(f"wrote {args.out}: {Path(args.out).read_text().strip().splitlines()[-1]}")
    return rows


if __name__ == "__main__":
    main()
