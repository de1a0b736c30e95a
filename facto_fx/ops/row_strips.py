"""Row-centric strips (LR-CNN): run a chain of local layers one horizontal strip at a time.

Pure PyTorch. A strip runs every node of a segment on the rows it needs: each op gets a slice of
its input whose first row is a multiple of its stride, is run as it is (its own padding and
kernels, Facto's and HOSVD's layers included), and its output is cropped to the rows its users
need, dropping rows computed from padding that is not the map's own. Convolutions, most of the
work (plain nn.Conv2d and Facto's), skip those rows: they run unpadded along the height on exactly
the rows they read, zero-padded only at the map's own edges. Every op that saves its map mean-pooled
(Facto's conv, scale and frozen batch-norm) computes whole tiles of that pool, so M, s and γ train
on the unsplit layer's gradient. Rows needed are
found backwards from the strip's share of the segment's output, so boundaries need no other
alignment, and the result equals the unsplit chain up to float rounding.

Two modes (the paper's OverL and 2PS):
- "overlap" (OverL): strips are independent; each recomputes the halo rows it shares with its
  neighbours, runs under non-reentrant checkpointing, and keeps only its input slice.
- "two_phase" (2PS): strips run in order, each handing the next the rows of every layer it
  needs ("tails") instead of recomputing them; the tails are kept as checkpoint inputs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)
from torch.utils.checkpoint import checkpoint

from facto_fx.ops.max_pool import max_pool2d
from facto_fx.ops.relu import relu

Rows = tuple[int, int]  # [start, stop) along the height


@dataclass(frozen=True)
class RowGeometry:
    """The window of input rows an output row reads: rows o·s − p … o·s − p + d·(k − 1)."""

    kernel: int = 1
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    ceil_mode: bool = False
    tile: int = 1  # output rows are computed in whole tiles of this many (see `tiled`)

    def out_rows(self, rows: int) -> int:
        """Output height for an input of `rows` rows (torch's formula, ceil_mode included)."""
        span = rows + 2 * self.padding - self.dilation * (self.kernel - 1) - 1
        out = (span + (self.stride - 1 if self.ceil_mode else 0)) // self.stride + 1
        if self.ceil_mode and (out - 1) * self.stride >= rows + self.padding:
            out -= 1
        return out

    def window(self, lo: int, hi: int) -> tuple[int, int]:
        """The input rows [a, b) that output rows [lo, hi) read, padding included: a is negative
        and b past the map where those rows are the op's padding."""
        first = lo * self.stride - self.padding
        return first, (hi - 1) * self.stride - self.padding + self.dilation * (self.kernel - 1) + 1

    def tiled(self, lo: int, hi: int, out_rows: int) -> tuple[int, int]:
        """Output rows [lo, hi) widened to whole tiles of the `out_rows`-row output.

        Facto's ops save their map mean-pooled in k×k tiles (a conv's projection, a scale's or
        frozen batch-norm's input) and train M, s or γ from them: a strip that computed part of a
        tile would pool other rows than the unsplit layer. Computing whole
        tiles, the rows a strip does not keep get no gradient there, so the strips' shares of each
        tile's gradient add up to the unsplit layer's.
        """
        t = self.tile
        return lo - lo % t, min(out_rows, -(-hi // t) * t)

    def reads(self, lo: int, hi: int, rows: int) -> tuple[int, int]:
        """The input rows [i0, i1) to give the op so that its output holds rows [lo, hi) exactly
        (whole tiles of them, `tiled`).

        i0 is a multiple of the stride (or 0), so the op run on the slice alone computes global row
        i0 / s + j as its row j; rows it padded that are not padding of the whole map are cropped.
        """
        start, end = self.window(*self.tiled(lo, hi, self.out_rows(rows)))
        start = max(0, start)
        return start - start % self.stride, min(rows, end)


@dataclass
class StripPlan:
    """One strip of one segment: the rows each node keeps, the rows each op reads, the tails."""

    keep: dict[fx.Node, Rows]  # rows of each node's output the strip holds (its working rows)
    reads: dict[fx.Node, Rows]  # input rows each op is given
    compute: dict[fx.Node, Rows]  # rows each op produces in this strip (two_phase: its new rows)
    tails_in: dict[fx.Node, Rows] = field(default_factory=dict)  # rows received from the previous strip
    tails_out: dict[fx.Node, Rows] = field(default_factory=dict)  # rows handed to the next strip


@dataclass
class Segment:
    """Nodes from one cut (exclusive) to a later one (inclusive), and how they run."""

    start: fx.Node
    nodes: list[fx.Node]
    strips: list[StripPlan]  # empty: run whole, as the unsplit model would
    rows: dict[fx.Node, int] = field(default_factory=dict)  # each node's full output height

    @property
    def end(self) -> fx.Node:
        return self.nodes[-1]


def heights(nodes: Sequence[fx.Node], geometry: dict[fx.Node, RowGeometry], source: fx.Node,
            rows: int) -> dict[fx.Node, int]:
    """Each node's output height for an input of `rows` rows."""
    out = {source: rows}
    for node in nodes:
        args = [a for a in node.all_input_nodes if a in out]
        out[node] = geometry[node].out_rows(out[args[0]])
    return out


def _split(rows: int, strips: int) -> list[int]:
    return [round(j * rows / strips) for j in range(strips + 1)]


def _region_args(node: fx.Node, known: Collection[fx.Node]) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if a in known]


def overlap_plans(start: fx.Node, nodes: list[fx.Node], geometry: dict[fx.Node, RowGeometry],
                  rows: dict[fx.Node, int], strips: int) -> list[StripPlan]:
    """Independent strips: each node keeps the union of the rows its users read."""
    plans = []
    bounds = _split(rows[nodes[-1]], strips)
    members = {start, *nodes}
    for lo, hi in pairwise(bounds):
        keep: dict[fx.Node, Rows] = {nodes[-1]: (lo, hi)}
        reads: dict[fx.Node, Rows] = {}
        for node in reversed(nodes):
            if node not in keep:
                continue  # dead within the segment
            args = _region_args(node, members)
            i0, i1 = geometry[node].reads(*keep[node], rows[args[0]])
            reads[node] = (i0, i1)
            for arg in args:
                a0, a1 = keep.get(arg, (i0, i1))
                keep[arg] = (min(a0, i0), max(a1, i1))
        plans.append(StripPlan(keep, reads, {n: keep[n] for n in nodes if n in keep}))
    return plans


def two_phase_plans(start: fx.Node, nodes: list[fx.Node], geometry: dict[fx.Node, RowGeometry],
                    rows: dict[fx.Node, int], strips: int) -> list[StripPlan]:
    """Sequential strips: each computes only rows no earlier strip computed, and receives the
    older rows its ops read (the tails) from the strip before it."""
    members = {start, *nodes}
    done = dict.fromkeys(members, 0)  # rows [0, done) of each node computed by earlier strips
    strip_reads, strip_compute, strip_done, lowest = [], [], [], []
    for hi in _split(rows[nodes[-1]], strips)[1:]:
        top = dict(done)
        top[nodes[-1]] = hi
        reads: dict[fx.Node, Rows] = {}
        low: dict[fx.Node, int] = {}  # lowest row of each node an op reads in this strip
        for node in reversed(nodes):
            if top[node] <= done[node]:
                continue
            args = _region_args(node, members)
            reads[node] = i0, i1 = geometry[node].reads(done[node], top[node], rows[args[0]])
            for arg in args:
                top[arg], low[arg] = max(top[arg], i1), min(low.get(arg, i0), i0)
        strip_reads.append(reads)
        strip_compute.append({n: (done[n], top[n]) for n in reads})
        strip_done.append(dict(done))
        lowest.append(low)
        done = top
    plans: list[StripPlan] = []
    needed: dict[fx.Node, int] = {}  # lowest row any later strip reads (rows are read in order)
    for j in reversed(range(len(strip_reads))):
        needed.update(lowest[j])
        before, after = strip_done[j], (strip_done[j + 1] if j + 1 < len(strip_done) else done)
        keep = {n: (min(needed.get(n, before[n]), before[n]), after[n]) for n in nodes
                if n in strip_compute[j] or needed.get(n, after[n]) < after[n]}
        if start in lowest[j]:
            keep[start] = (lowest[j][start], after[start])
        tails_in = {n: (lo, before[n]) for n, (lo, _) in keep.items() if n is not start and lo < before[n]}
        plans.append(StripPlan(keep, strip_reads[j], strip_compute[j], tails_in))
    plans.reverse()
    for previous, plan in pairwise(plans):
        previous.tails_out = dict(plan.tails_in)
    return plans


def _overhead(plans: list[StripPlan], nodes: list[fx.Node], rows: dict[fx.Node, int],
              row_bytes: dict[fx.Node, int]) -> float:
    """The share of the segment's maps (rows weighted by their bytes, so by work too) the strips
    compute beyond the unsplit segment: overlap's recomputation of halos."""
    split = sum((p.keep[n][1] - p.keep[n][0]) * row_bytes[n] for p in plans for n in nodes if n in p.keep)
    whole = sum(rows[n] * row_bytes[n] for n in nodes)
    return split / whole - 1 if whole else float("inf")


def feasible(plans: list[StripPlan], start: fx.Node, nodes: list[fx.Node],
             geometry: dict[fx.Node, RowGeometry]) -> bool:
    """Whether every op of every strip is given rows its inputs hold, and returns the rows asked
    of it: unusual paddings or maps thinner than the strips can leave an op nothing to compute
    from; such a segment runs whole instead."""
    members = {start, *nodes}
    for plan in plans:
        for node, (i0, i1) in plan.reads.items():
            g = geometry[node]
            if i1 <= i0 or i1 - i0 + 2 * g.padding < g.dilation * (g.kernel - 1) + 1:
                return False
            for arg in _region_args(node, members):
                held = plan.keep.get(arg)
                if held is None or not held[0] <= i0 < i1 <= held[1]:
                    return False
            first, (c0, c1) = i0 // g.stride, plan.compute[node]
            if not first <= c0 < c1 <= first + g.out_rows(i1 - i0):
                return False
    return True


def plan_segments(region_nodes: list[fx.Node], cuts: list[fx.Node], geometry: dict[fx.Node, RowGeometry],
                  rows: dict[fx.Node, int], row_bytes: dict[fx.Node, int], strips: int, mode: str,
                  max_overhead: float) -> list[Segment]:
    """Cut the chain at single-value points into segments from the input, each as long as its
    overlap strips recompute at most `max_overhead` of its maps. From the first point where no
    segment is that cheap (maps too small for the halos), the rest runs whole, as unsplit:
    short strip segments there would save little and copy maps at every boundary.

    The overhead is counted without Facto's tiles (`RowGeometry.tiled`): the rows they add keep
    M's gradient exact, and cutting segments for them would hold a whole map at every extra cut
    (resnet50's Facto + strips peak rose from 0.23 to 0.30 of vanilla's)."""
    position = {n: i for i, n in enumerate(region_nodes)}
    untiled = {n: dataclasses.replace(g, tile=1) for n, g in geometry.items()}

    def between(a: fx.Node, b: fx.Node) -> list[fx.Node]:
        return region_nodes[(position[a] + 1 if a in position else 0): position[b] + 1]

    segments: list[Segment] = []
    i = 0
    while i < len(cuts) - 1:
        best = None
        for k in range(i + 1, len(cuts)):
            if rows[cuts[k]] < strips:
                break
            nodes = between(cuts[i], cuts[k])
            if _overhead(overlap_plans(cuts[i], nodes, untiled, rows, strips), nodes, rows, row_bytes) > max_overhead:
                break
            plans = (two_phase_plans if mode == "two_phase" else overlap_plans)(cuts[i], nodes, geometry, rows, strips)
            if not feasible(plans, cuts[i], nodes, geometry):
                break
            best = k, nodes, plans
        if best is None:
            segments.append(Segment(cuts[i], between(cuts[i], cuts[-1]), []))
            break
        k, nodes, plans = best
        segments.append(Segment(cuts[i], nodes, plans, rows))
        i = k
    return segments


def _rows(t: Tensor, start: int, lo: int, hi: int) -> Tensor:
    return t[:, :, lo - start: hi - start]


def _conv_rows(conv: Callable[[Tensor], Tensor], g: RowGeometry, x: Tensor, start: int, rows: int, c0: int,
               c1: int) -> Tensor:
    """Output rows [c0, c1) of a conv on a map of `rows` rows, of which `x` holds rows from `start`;
    `conv` runs it with no padding along the height (`_height_unpadded`).

    The conv reads input rows w0·s − p … (w1 − 1)·s − p + d·(k − 1) for its rows [w0, w1) (whole
    tiles, `RowGeometry.tiled`, around [c0, c1)); those outside the map are its zero padding, added
    here. Run on a slice with its own padding it would also compute rows from padding that is not
    the map's at both ends of the slice: a third more rows than needed for resnet50's 3×3 convs at
    8 strips, and, in a Facto conv, rows its pooled projection would mix into real ones.
    """
    w0, w1 = g.tiled(c0, c1, g.out_rows(rows))
    lo, hi = g.window(w0, w1)
    inside = _rows(x, start, max(lo, 0), min(hi, rows))
    if lo < 0 or hi > rows:
        inside = F.pad(inside, (0, 0, max(-lo, 0), max(hi - rows, 0)))
    return _rows(conv(inside), w0, c0, c1)


def _height_unpadded(module: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """`module` run with no padding along the height, if it is a convolution that can: a plain
    nn.Conv2d padding with zeros, or a layer offering `forward_padded(x, padding)` (Facto's)."""
    if type(module) is nn.Conv2d and module.padding_mode == "zeros" and isinstance(module.padding, tuple):
        return lambda x: F.conv2d(x, module.weight, module.bias, module.stride, (0, module.padding[1]),
                                  module.dilation, module.groups)
    forward_padded = getattr(module, "forward_padded", None)
    if forward_padded is not None:
        return lambda x: forward_padded(x, (0, module.padding[1]))
    return None


# Ops whose only difference from torch's is what they save (bit masks): within a checkpointed
# strip nothing they save outlives the strip, so torch's own, cheaper ops run there instead.
# Values and gradients are the same.
PLAIN_IN_STRIPS = {relu: torch.relu, max_pool2d: torch.nn.functional.max_pool2d}


class StripExecutor:
    """Runs a segment's nodes (of a GraphModule holding their modules) strip by strip."""

    def __init__(self, gm: fx.GraphModule, geometry: dict[fx.Node, RowGeometry]) -> None:
        self.interpreter = fx.Interpreter(gm)
        self.geometry = geometry

    def _call(self, node: fx.Node, env: dict[fx.Node, Tensor], in_strip: bool = False) -> Tensor:
        def value(a: fx.Node) -> object:
            if a.op == "get_attr":
                return self.interpreter.fetch_attr(a.target)
            return env[a]

        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        target = node.target
        if in_strip and node.op == "call_function":
            target = PLAIN_IN_STRIPS.get(target, target)
        return getattr(self.interpreter, node.op)(target, args, kwargs)

    def _unpadded_conv(self, node: fx.Node) -> Callable[[Tensor], Tensor] | None:
        """The node's conv run unpadded along the height, where it pads the height or computes in
        tiles: strips run it on exactly the rows they need (`_conv_rows`) instead of on a slice it
        pads again."""
        if node.op != "call_module":
            return None
        if self.geometry[node].padding == 0 and self.geometry[node].tile == 1:
            return None
        return _height_unpadded(self.interpreter.fetch_attr(node.target))

    def run_whole(self, segment: Segment, x: Tensor) -> Tensor:
        env = {segment.start: x}
        for node in segment.nodes:
            env[node] = self._call(node, env)
        return env[segment.end]

    def run_strip(self, segment: Segment, plan: StripPlan, x: Tensor, *tails: Tensor) -> tuple[Tensor, ...]:
        """The strip's rows of the segment's output, then the tails for the next strip. `x` holds
        rows plan.keep[start] of the segment's input; `tails` rows plan.tails_in, in order."""
        work: dict[fx.Node, tuple[Tensor, int]] = {segment.start: (x, plan.keep.get(segment.start, (0, 0))[0])}
        received = dict(zip(plan.tails_in, tails, strict=True))
        for node in segment.nodes:
            if node not in plan.reads:
                if node in received:
                    work[node] = received[node], plan.tails_in[node][0]
                continue
            c0, c1 = plan.compute[node]
            conv = self._unpadded_conv(node)
            if conv is not None:
                (source,) = node.all_input_nodes
                computed = _conv_rows(conv, self.geometry[node], *work[source], segment.rows[source], c0, c1)
            else:
                i0, i1 = plan.reads[node]
                args = {a: _rows(work[a][0], work[a][1], i0, i1) for a in node.all_input_nodes if a in work}
                out = self._call(node, args, in_strip=True)
                computed = _rows(out, i0 // self.geometry[node].stride, c0, c1)
            if node in received:
                computed = torch.cat([received[node], computed], dim=2)
            work[node] = computed, plan.keep[node][0]
        end = segment.end
        outputs = [_rows(work[end][0], work[end][1], *plan.compute[end])]
        # Copies: a view would keep the whole strip's map alive as long as the next strip keeps its tail.
        outputs += [_rows(work[n][0], work[n][1], lo, hi).clone() for n, (lo, hi) in plan.tails_out.items()]
        return tuple(outputs)

    def run(self, segment: Segment, x: Tensor) -> Tensor:
        """The segment's output for input `x`: strips under non-reentrant checkpointing when
        autograd records, each keeping only its input slice (and, two_phase, its tails)."""
        if not segment.strips:
            return self.run_whole(segment, x)
        pieces, tails = [], ()
        record = torch.is_grad_enabled()
        for plan in segment.strips:
            lo, hi = plan.keep.get(segment.start, (0, 0))
            inputs = (x[:, :, lo:hi], *tails)
            if record:
                out = checkpoint(self.run_strip, segment, plan, *inputs, use_reentrant=False)
            else:
                out = self.run_strip(segment, plan, *inputs)
            pieces.append(out[0])
            tails = out[1:]
        return torch.cat(pieces, dim=2)


class RowStripRegion(nn.Module):
    """A chain of local layers run in strips; the layers stay the model's own (same objects,
    same names in its state_dict), held here through a GraphModule of the chain alone."""

    def __init__(self, chain: fx.GraphModule, geometry: dict[str, RowGeometry], cuts: Sequence[str],
                 strips: int, mode: str, max_overhead: float) -> None:
        super().__init__()
        # Not a child module: the layers are registered where the model has them.
        object.__setattr__(self, "chain", chain)
        self.geometry, self.cuts = dict(geometry), list(cuts)
        self.strips, self.mode, self.max_overhead = strips, mode, max_overhead
        self._plans: dict[tuple, list[Segment]] = {}

    def segments(self, x: Tensor) -> list[Segment]:
        """How input `x` runs: the segments and their strips (cached per input shape and dtype)."""
        rows = x.shape[2]
        key = (id(self.chain.graph), tuple(x.shape), x.dtype)
        if key not in self._plans:
            nodes = [n for n in self.chain.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
            by_name = {n.name: n for n in self.chain.graph.nodes}
            source = next(n for n in self.chain.graph.nodes if n.op == "placeholder")
            geometry = {n: self.geometry[n.name] for n in nodes}
            height = heights(nodes, geometry, source, rows)
            cuts = [by_name[c] for c in self.cuts]
            self._plans[key] = plan_segments(nodes, cuts, geometry, height, self._row_bytes(x, nodes), self.strips,
                                             self.mode, self.max_overhead)
        return self._plans[key]

    def _row_bytes(self, x: Tensor, nodes: list[fx.Node]) -> dict[fx.Node, int]:
        """Bytes per row of each node's output, from a run on fake tensors (nothing allocated);
        where an op's output depends on the data (HOSVD's ranks, ErrorBounded's codes), from a real run of
        one sample without autograd, scaled to the batch."""
        runner = fx.Interpreter(self.chain, garbage_collect_values=False)
        try:
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                runner.run(mode.from_tensor(x))
            scale = 1
        except (DynamicOutputShapeException, DataDependentOutputException):
            with torch.no_grad():
                runner.run(x[:1])
            scale = x.shape[0]
        shapes = {node: (runner.env[node].shape, runner.env[node].element_size()) for node in nodes}
        runner.env.clear()
        return {n: math.prod(s) // s[2] * size * scale for n, (s, size) in shapes.items()}

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # an unbatched (C, H, W) map: a batch of one
            return self(x.unsqueeze(0)).squeeze(0)
        if x.dim() != 4:
            raise ValueError(f"row strips run (N, C, H, W) or (C, H, W) maps; got shape {tuple(x.shape)}")
        segments = self.segments(x)
        executor = StripExecutor(self.chain, {n: self.geometry[n.name] for s in segments for n in s.nodes})
        for segment in segments:
            x = executor.run(segment, x)
        return x

    def extra_repr(self) -> str:
        return f"strips={self.strips}, mode={self.mode!r}, max_overhead={self.max_overhead}, {len(self.geometry)} nodes"
