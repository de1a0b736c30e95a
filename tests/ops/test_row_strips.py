"""Row strips are lossless: outputs and every gradient equal the unsplit model's (dense autograd on
the original model is the reference), for odd sizes, strides, dilations, ceil-mode pooling,
residual blocks, strip counts that do not divide the height, both modes, every layout."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import facto_fx
from facto_fx import RowStrips
from facto_fx.ops.row_strips import RowGeometry, heights, overlap_plans, two_phase_plans


class Block(nn.Module):
    def __init__(self, c: int, stride: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.b = nn.Conv2d(c, c, 3, 1, 2, dilation=2)
        self.skip = nn.Conv2d(c, c, 1, stride) if stride > 1 else nn.Identity()
        self.bn.running_mean.uniform_(-0.5, 0.5)
        self.bn.running_var.uniform_(0.5, 2.0)
        self.bn.num_batches_tracked += 1

    def forward(self, x):
        return F.relu(self.b(F.relu(self.bn(self.a(x)))) + self.skip(x))


class Stack(nn.Module):
    """Every local op the pass knows, in odd shapes, then a global head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, (5, 3), stride=2, padding=(2, 1))
        self.pool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.block1 = Block(6, 1)
        self.block2 = Block(6, 2)
        self.avg = nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False)
        self.w = nn.Parameter(torch.randn(4, 6, 3, 3) * 0.2)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = self.pool(F.relu(self.stem(x)))
        x = self.block2(self.block1(x))
        x = torch.sigmoid(F.conv2d(self.avg(x), self.w, padding=1)) * 2.0
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _grads(model: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    (out * weight).sum().backward()
    return (out.detach(), x.grad, *(p.grad for p in model.parameters()))


def _compare(model: nn.Module, x: torch.Tensor, strips: RowStrips, rtol: float, **options) -> None:
    reference = copy.deepcopy(model).eval()  # eval: batch-norm statistics, as the compiled model freezes them
    fmodel = facto_fx.compile(model, apply_ratio=0.0, row_strips=strips, example_inputs=(x[:1],),
                              **{"batch_norm": "freeze", **options})
    segments = fmodel.row_strips.segments(x)
    assert any(s.strips for s in segments), "nothing ran in strips: the test would prove nothing"
    weight = torch.randn(reference(x).shape, dtype=x.dtype)
    expected = _grads(reference, x, weight)
    fmodel.train()
    for m in fmodel.modules():
        if isinstance(m, (nn.Dropout, facto_fx.layers.FactoDropout)):
            m.eval()  # the classifier's dropout (vgg): the reference has it off
    actual = _grads(fmodel, x, weight)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        scale = e.abs().max().item()
        assert (a - e).abs().max().item() <= rtol * scale, (a - e).abs().max().item() / scale


@pytest.mark.parametrize("mode", ["overlap", "two_phase"])
@pytest.mark.parametrize("strips,height,width", [(2, 64, 48), (3, 61, 37), (5, 77, 40), (4, 23, 19)])
def test_float64_strips_equal_the_unsplit_model(mode, strips, height, width):
    torch.manual_seed(strips)
    model = Stack().double()
    x = torch.randn(2, 3, height, width, dtype=torch.float64)
    _compare(model, x, RowStrips(strips, mode, max_overhead=4.0), 1e-10)


@pytest.mark.parametrize("mode", ["overlap", "two_phase"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_float32_layouts_and_batch_one(mode, layout):
    torch.manual_seed(0)
    model = Stack()
    x = torch.randn(1, 3, 2 * 53, 2 * 31)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        x = x[:, :, ::2, ::2]
    _compare(model, x, RowStrips(3, mode, max_overhead=4.0), 1e-5)


def test_facto_layers_inside_strips_train_as_without_strips():
    """Facto at lossy kernel 1 (and no codes: batch-norm's x̂ kept whole) has exact gradients for
    M, so its layers split into strips must give what the same Facto model gives unsplit."""
    torch.manual_seed(0)
    model = Stack().double()
    x = torch.randn(2, 3, 45, 33, dtype=torch.float64)
    options = {"apply_ratio": 1.0, "lossy_kernel": 1, "store_bits": None, "example_inputs": (x[:1],)}
    plain = facto_fx.compile(model, **options)
    split = facto_fx.compile(model, row_strips=RowStrips(3, max_overhead=4.0), **options)
    assert any(isinstance(m, facto_fx.layers.FactoConv2d) for m in split.modules())
    weight = torch.randn(2, 5, dtype=torch.float64)
    expected, actual = _grads(plain, x, weight), _grads(split, x, weight)
    assert [a is None for a in actual] == [e is None for e in expected]
    assert sum(a is not None for a in actual) > 4  # M of every Facto conv, and more
    for a, e in zip(actual, expected, strict=True):
        assert a is None or torch.allclose(a, e, rtol=1e-10, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 40), kernel=st.integers(1, 5), stride=st.integers(1, 3), dilation=st.integers(1, 2),
    padding=st.integers(0, 3), ceil_mode=st.booleans(), tile=st.integers(1, 3), data=st.data(),
)
def test_an_op_run_on_the_rows_it_reads_gives_those_rows(rows, kernel, stride, dilation, padding, ceil_mode, tile,
                                                        data):
    """RowGeometry against torch itself: the output height, and that the slice `reads` names
    yields exactly the wanted output rows, widened to the whole tiles that hold them, at the row
    index it promises."""
    if padding > kernel // 2 or rows + 2 * padding < dilation * (kernel - 1) + 1:
        return  # torch refuses these
    g = RowGeometry(kernel, stride, padding, dilation, ceil_mode, tile)
    x = torch.randn(1, 1, rows, 3, dtype=torch.float64)

    def pool(t):
        return F.max_pool2d(t, (kernel, 1), (stride, 1), (padding, 0), (dilation, 1), ceil_mode)

    full = pool(x)
    assert g.out_rows(rows) == full.shape[2]
    lo = data.draw(st.integers(0, full.shape[2] - 1))
    hi = data.draw(st.integers(lo + 1, full.shape[2]))
    i0, i1 = g.reads(lo, hi, rows)
    part = pool(x[:, :, i0:i1])
    first = i0 // stride
    w0, w1 = g.tiled(lo, hi, full.shape[2])
    tiles = {r // tile for r in range(lo, hi)}  # the tiles holding the wanted rows, and all their rows
    assert list(range(w0, w1)) == [r for r in range(full.shape[2]) if r // tile in tiles]
    assert torch.equal(part[:, :, w0 - first: w1 - first], full[:, :, w0:w1])


def test_two_phase_computes_every_row_once_and_overlap_covers_every_row():
    """Counted per node over the strips: two_phase's new rows tile each map exactly; overlap's rows
    cover it, with its recomputation the sum beyond the map's height."""
    torch.manual_seed(0)
    fmodel = facto_fx.compile(Stack(), apply_ratio=0.0, row_strips=RowStrips(4, max_overhead=4.0), verify=False)
    region = fmodel.row_strips
    (segment,) = [s for s in region.segments(torch.randn(2, 3, 70, 40)) if s.strips]
    nodes = segment.nodes
    geometry = {n: region.geometry[n.name] for n in nodes}
    assert segment.start.op == "placeholder"
    rows = heights(nodes, geometry, segment.start, 70)
    for plans, tiles in ((two_phase_plans(segment.start, nodes, geometry, rows, 4), True),
                         (overlap_plans(segment.start, nodes, geometry, rows, 4), False)):
        for node in nodes:
            computed = sorted(p.compute[node] for p in plans if node in p.compute)
            covered = set()
            for lo, hi in computed:
                assert not (tiles and covered & set(range(lo, hi))), node.name
                covered |= set(range(lo, hi))
            assert covered == set(range(rows[node])), node.name


@pytest.mark.parametrize("mode", ["overlap", "two_phase"])
@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_torchvision_trunks_keep_every_gradient(name, mode):
    """The issue's check on the paper's models, at a small size in float64 (batch-norm frozen)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10)
    if name == "vgg16":
        model.classifier = nn.Linear(512 * 7 * 7, 10)  # the trunk is what strips run; a small head keeps it quick
    model = model.double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5), m.weight.data.uniform_(0.5, 1.5)
            m.num_batches_tracked += 1
    _compare(model, torch.randn(1, 3, 96, 80, dtype=torch.float64), RowStrips(4, mode), 1e-10)


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_torch_compile_of_a_strips_model_matches_eager(backend):
    torch.manual_seed(0)
    model = Stack()
    fmodel = facto_fx.compile(model, apply_ratio=0.0, row_strips=RowStrips(3, "two_phase", max_overhead=4.0))
    x = torch.randn(2, 3, 40, 36)
    weight = torch.randn(2, 5)
    expected = _grads(fmodel, x, weight)
    fmodel.zero_grad()
    actual = _grads(torch.compile(fmodel, backend=backend), x, weight)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["overlap", "two_phase"])
def test_maps_that_grow_or_thin_out_fall_back_to_running_whole(mode):
    """Paddings beyond half the kernel (maps that grow) and maps thinner than the strips: where a
    strip's op would have no rows to compute from, that part of the chain runs whole (a review's
    fuzzing found such chains crashing)."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.MaxPool2d((4, 1), 1, (2, 0)), nn.Conv2d(2, 2, (3, 1), 1, (1, 0)),
        nn.Conv2d(2, 2, (4, 1), (2, 1), (3, 0)), nn.Conv2d(2, 2, (5, 1), 1, (5, 0)),
        nn.Conv2d(2, 2, (3, 1), (3, 1), (1, 0)), nn.Conv2d(2, 2, (3, 1), (3, 1), (3, 0)),
        nn.Flatten(), nn.Linear(8, 3),
    ).double()
    x = torch.randn(1, 2, 16, 1, dtype=torch.float64)
    for strips in (3, 8):
        fmodel = facto_fx.compile(copy.deepcopy(model), apply_ratio=0.0, example_inputs=(x,),
                                  row_strips=RowStrips(strips, mode, max_overhead=4.0))
        weight = torch.randn(1, 3, dtype=torch.float64)
        for a, e in zip(_grads(fmodel, x, weight), _grads(copy.deepcopy(model), x, weight), strict=True):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
