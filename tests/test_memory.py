"""Saved-for-backward bytes (docs/design.md §5): analytic == measured, reference figures, per-op sizes."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

import facto_fx
from facto_fx.models import fixup_resnet18
from facto_fx.report import HEADING

MiB = 2**20


@pytest.fixture(scope="module")
def vgg11():
    return torchvision.models.vgg11(weights=None, num_classes=4)


def _rows(report: facto_fx.MemoryReport) -> dict[str, tuple[str, str, int, int]]:
    return {r.layer: (r.op, r.decision, r.vanilla_bytes, r.facto_bytes) for r in report.rows}


@pytest.mark.parametrize("which", ["vgg11", "fixup_resnet18"])
def test_analytic_equals_measured(vgg11, which):
    model = vgg11 if which == "vgg11" else fixup_resnet18(num_classes=4)
    fmodel = facto_fx.compile(model)
    x = torch.randn(2, 3, 64, 64)
    analytic = facto_fx.report(fmodel, x, analytic=True)
    measured = facto_fx.report(fmodel, x)
    assert _rows(analytic) == _rows(measured)
    assert (analytic.vanilla_bytes, analytic.facto_bytes) == (measured.vanilla_bytes, measured.facto_bytes)
    assert 0 < measured.facto_bytes < measured.vanilla_bytes
    assert measured.ratio == measured.facto_bytes / measured.vanilla_bytes


def test_vgg11_vanilla_reference_figure(vgg11):
    """docs/design.md §5: eager torchvision vgg11 at batch 2, 224x224 saves 93.2 MiB (69.9 MiB fp32
    activations + 23.4 MiB int64 max-pool indices). analytic=True gives the measured figure, fast."""
    report = facto_fx.report(facto_fx.compile(vgg11), torch.empty(2, 3, 224, 224, device="meta"), analytic=True)
    assert report.vanilla_bytes / MiB == pytest.approx(93.2, abs=0.1)
    assert report.facto_bytes < report.vanilla_bytes


def test_per_op_saved_sizes(vgg11):
    """At 64x64, batch 2: bit-packed ReLU masks, 2-bit pool codes, and Z_p of C_R channels at H/k,
    each what its layer's own backward keeps."""
    fmodel = facto_fx.compile(vgg11)
    rows = {r.layer: r for r in facto_fx.report(fmodel, torch.randn(2, 3, 64, 64), analytic=True).rows}
    # features.1 follows the 2x2 pool it was swapped with: its mask is at the pooled size.
    assert rows["features.1"].facto_own_bytes == math.ceil(2 * 64 * 32 * 32 / 8)
    assert rows["features.7"].facto_own_bytes == math.ceil(2 * 256 * 16 * 16 / 8)
    assert rows["classifier.1"].facto_own_bytes == math.ceil(2 * 4096 / 8)
    assert rows["features.7"].vanilla_own_bytes == rows["features.7"].vanilla_bytes == 2 * 256 * 16 * 16 * 4
    assert rows["features.2"].facto_own_bytes == 2 * 64 * 32 * 32 * 2 // 8
    c_r = round(0.3 * 64)
    assert (rows["features.3"].decision, rows["features.3"].facto_own_bytes) == ("facto", 2 * c_r * 16 * 16 * 4)
    assert rows["features.0"].facto_own_bytes == rows["features.0"].vanilla_own_bytes == 2 * 3 * 64 * 64 * 4


def test_rows_charge_each_map_to_the_layer_that_produced_it():
    """Both columns charge a saved map to its producer, and a form a layer makes itself (a mask, a
    code) to the map vanilla's layer kept: so the rows add up to the totals, and a dense conv after
    a ReLU does not read 0 -> full (vanilla's ReLU saved the shared output first)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1))
    fmodel = facto_fx.compile(model, exclude=["2"])  # "2": dense, after a ReLU that keeps a mask under Facto
    x = torch.randn(2, 3, 12, 12)
    report = facto_fx.report(fmodel, x)
    rows = {r.layer: r for r in report.rows}
    full, mask = 2 * 8 * 12 * 12 * 4, math.ceil(2 * 8 * 12 * 12 / 8)
    assert (rows["1"].vanilla_bytes, rows["1"].facto_bytes) == (full, full + mask)  # "2" keeps it whole
    assert rows["1"].kept_for == ("1", "2")
    assert (rows["2"].vanilla_own_bytes, rows["2"].facto_own_bytes) == (full, full)
    assert rows["3"].kept_for == ("3", "4") and rows["3"].facto_bytes < rows["3"].vanilla_bytes == full
    assert sum(r.vanilla_bytes for r in report.rows) == report.vanilla_bytes
    assert sum(r.facto_bytes for r in report.rows) == report.facto_bytes
    assert report.vanilla_bytes == x.nbytes + 2 * full  # the input and each ReLU's output, once


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
def test_no_row_reads_nothing_to_something(name):
    model = torchvision.models.get_model(name, num_classes=4)
    report = facto_fx.report(facto_fx.compile(model), torch.empty(2, 3, 64, 64, device="meta"), analytic=True)
    assert [r.layer for r in report.rows if r.facto_bytes and not r.vanilla_bytes] == []
    # More than vanilla only where a ReLU keeps its mask beside the map a dense layer keeps whole.
    for r in report.rows:
        if r.facto_bytes > r.vanilla_bytes:
            assert r.op == "relu" and r.facto_bytes <= r.vanilla_bytes * (1 + 1 / 32), r


def test_bf16_storage_halves_compressed_maps(vgg11):
    x = torch.empty(2, 3, 64, 64, device="meta")
    fp32 = _rows(facto_fx.report(facto_fx.compile(vgg11), x, analytic=True))
    bf16 = _rows(facto_fx.report(facto_fx.compile(vgg11, storage_dtype="bf16"), x, analytic=True))
    assert bf16["features.3"][3] * 2 == fp32["features.3"][3]
    assert bf16["features.1"] == fp32["features.1"]  # masks are bits either way


def test_report_table(vgg11):
    report = facto_fx.report(facto_fx.compile(vgg11), torch.empty(2, 3, 64, 64, device="meta"), analytic=True)
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == HEADING
    assert lines[1].split() == ["layer", "op", "decision", "vanilla", "MiB", "facto", "MiB", "kept", "for"]
    total = next(line for line in lines if line.startswith("total"))
    assert f"{report.vanilla_bytes / MiB:.3f}" in total and "% of vanilla" in total
    assert "features.3" in text and "left unrewritten" not in text


def test_vgg16_batch_256_analytic_without_allocating():
    """docs/design.md §5: 17,909 MiB of saved feature maps; built on the meta device, nothing is allocated."""
    with torch.device("meta"):
        model = torchvision.models.vgg16(weights=None)
    fmodel = facto_fx.compile(model, verify=False)  # nothing can run on meta tensors
    report = facto_fx.report(fmodel, torch.empty(256, 3, 224, 224, device="meta"), analytic=True)
    assert report.vanilla_bytes / MiB == pytest.approx(17_909, rel=0.005)
    assert report.facto_bytes < report.vanilla_bytes / 5


def test_saved_bytes_by_node_counts_activations_not_parameters():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
    x = torch.randn(2, 4)
    assert facto_fx.saved_bytes_by_node(gm, [x]) == {"_0": 2 * 4 * 4, "_1": 2 * 3 * 4}
    assert facto_fx.saved_bytes_by_node(gm, [x], analytic=True) == {"_0": 2 * 4 * 4, "_1": 2 * 3 * 4}
    gm.requires_grad_(False)
    assert facto_fx.saved_bytes_by_node(gm, [x]) == {}
    assert facto_fx.saved_bytes_by_node(gm, [x], train_all=True) == {"_0": 2 * 4 * 4, "_1": 2 * 3 * 4}


def test_saved_bytes_of_a_call_equals_the_per_node_total_and_sees_checkpoint_segments():
    """The graph-free count agrees with the per-node one; a reentrant checkpoint keeps only its input."""
    from torch.utils.checkpoint import checkpoint

    from facto_fx.memory import saved_bytes, saved_bytes_by_node

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU())
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    params = list(model.parameters())
    per_node = saved_bytes_by_node(torch.fx.symbolic_trace(model), [x])
    assert saved_bytes(model, x, exclude=params) == sum(per_node.values()) > 0
    checkpointed = saved_bytes(lambda t: checkpoint(model, t, use_reentrant=True), x, exclude=params)
    assert checkpointed == x.numel() * x.element_size()


def test_measuring_does_not_keep_the_model_alive():
    """Autograd's graph holds the saved-tensor hooks; no cycle through it may outlive the call."""
    import gc
    import weakref

    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    fmodel = facto_fx.compile(model, apply_ratio=1.0, example_inputs=(x,))
    facto_fx.report(fmodel, x)
    refs = [weakref.ref(model), weakref.ref(fmodel)]
    del model, fmodel
    gc.collect()
    assert [r() for r in refs] == [None, None]


def test_peak_step_bytes_follows_the_allocator():
    """1 MB, then 2 MB more while the first is alive, then 0.5 MB after freeing it: 3 MB at most."""
    from facto_fx.memory import peak_step_bytes

    def step():
        first = torch.empty(1_000_000, dtype=torch.uint8)
        second = torch.empty(2_000_000, dtype=torch.uint8)
        del first
        third = torch.empty(500_000, dtype=torch.uint8)
        return second, third

    assert peak_step_bytes(step) == 3_000_000
    assert peak_step_bytes(lambda: None) == 0


def test_report_peak_is_at_least_what_is_saved_and_leaves_no_gradients():
    """Everything saved for backward is live when the forward ends, so the peak bounds it from above."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    fmodel = facto_fx.compile(model, apply_ratio=1.0, example_inputs=(x,))
    report = facto_fx.report(fmodel, x, peak=True)
    assert report.vanilla_peak >= report.vanilla_bytes > 0 and report.facto_peak >= report.facto_bytes > 0
    assert report.facto_peak < report.vanilla_peak
    assert "peak of a forward + backward" in str(report)
    assert all(p.grad is None for p in fmodel.parameters()) and all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="analytic"):
        facto_fx.report(fmodel, x, analytic=True, peak=True)


def test_peak_on_the_cpu_prints_nothing(capfd):
    """The profiler's C++ side logs its start and stop (and a failed GPU count) to stderr; a
    library call must not."""
    fmodel = facto_fx.compile(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)))
    capfd.readouterr()
    report = facto_fx.report(fmodel, torch.randn(2, 3, 16, 16), peak=True)
    assert report.facto_peak > 0
    assert capfd.readouterr().err == ""
