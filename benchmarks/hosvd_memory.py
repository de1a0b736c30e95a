"""The HOSVD paper's vanilla column, from facto_fx.report: the inputs the last N conv layers keep.

    python benchmarks/hosvd_memory.py

Batch 64 at 224², on meta tensors (nothing is allocated). For each model and N, the report's
per-layer input bytes of the layers `Last(N)` gives HOSVD (the paper's "vanilla" activation memory
of fine-tuning those layers), and the analytic HOSVD figure: the full-rank worst case, since real
ranks depend on the data (fine-tune on real data to see them; benchmarks/hosvd_digits.py).
"""

from __future__ import annotations

import torch
import torchvision

import facto_fx

PAPER_MIB = {("resnet18", 2): 12.25, ("resnet18", 4): 30.63, ("mobilenet_v2", 2): 15.31, ("mobilenet_v2", 4): 28.71}
MiB = 2**20


def main() -> dict:
    results = {}
    print(f"{'model':<14}{'last':>5}  {'vanilla MiB':>11}  {'paper':>6}  {'hosvd worst MiB':>15}  layers")
    for (name, last), paper in PAPER_MIB.items():
        model = getattr(torchvision.models, name)().to("meta")
        fmodel = facto_fx.compile(model, apply_ratio=0.0, methods={facto_fx.Last(last): facto_fx.HOSVD(0.8)},
                                  verify=False)
        report = facto_fx.report(fmodel, torch.empty(64, 3, 224, 224, device="meta"), analytic=True)
        rows = [row for row in report.rows if row.decision == "hosvd"]
        vanilla = sum(row.input_bytes for row in rows) / MiB
        worst = sum(row.facto_own_bytes for row in rows) / MiB
        results[name, last] = vanilla
        layers = ", ".join(r.layer for r in rows)
        print(f"{name:<14}{last:>5}  {vanilla:>11.2f}  {paper:>6.2f}  {worst:>15.2f}  {layers}")
    return results


if __name__ == "__main__":
    main()
