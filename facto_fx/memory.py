"""Saved bytes: what autograd keeps for backward during one forward pass (docs/design.md §5).

Every tensor autograd saves passes through `saved_tensors_hooks`; we record each one with the FX
node that saved it and the node whose output it is, excluding parameters and buffers, and count
unique storages. With
`analytic=True` the model's parameters and the inputs are swapped for meta tensors, so the same
figures come out for batch 256 at 224² without allocating them.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import weakref
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import Tensor, fx, nn
from torch.func import functional_call
from torch.utils import _pytree as pytree


def _storage_key(t: Tensor) -> int:
    return t.untyped_storage()._cdata


@dataclass(frozen=True)
class Saved:
    """One tensor autograd saved for backward during a forward pass.

    `producer` is the node whose output the tensor is (a view of it counts), or None where `saver`
    made it inside itself (a code, a mask, a statistic). `key` names the storage: a storage saved
    twice costs its bytes once.
    """

    saver: str
    producer: str | None
    key: int
    nbytes: int


Estimate = Callable[[tuple, dict], "int | None"]
_ESTIMATED = "<estimated>"  # where hooks charge what a node with an estimate saves


class _SavingInterpreter(fx.Interpreter):
    """Runs the graph node by node so every saved tensor can be charged to its node and traced to
    the node that produced it.

    A node with an estimate (a method whose saved size hooks cannot see) is recorded as saving the
    estimate computed from its arguments instead, unless the estimate is None. `input_bytes`, if
    given, gets the size of every call node's first tensor argument.
    """

    current = "<input>"

    def __init__(self, gm: fx.GraphModule, estimates: dict[str, Estimate], input_bytes: dict[str, int] | None) -> None:
        super().__init__(gm)
        self.estimates, self.input_bytes = estimates, input_bytes
        self.records: list[Saved] = []
        self.producers: dict[int, str] = {}  # storage key -> the first node whose output lives there
        self._holders: Counter[int] = Counter()  # live node outputs per storage key
        self._finalizers: list[weakref.finalize] = []

    def run_node(self, n: fx.Node):
        self.current = n.name
        estimate = self.estimates.get(n.name)
        if (estimate is not None or self.input_bytes is not None) and n.op.startswith("call"):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if self.input_bytes is not None and args and isinstance(args[0], Tensor):
                self.input_bytes[n.name] = args[0].nelement() * args[0].element_size()
            nbytes = None if estimate is None else estimate(args, kwargs)
            if nbytes is not None:
                self.records.append(Saved(n.name, None, -len(self.records) - 1, nbytes))
                self.current = _ESTIMATED
        first_record = len(self.records)
        result = super().run_node(n)
        if n.op != "get_attr":
            inputs = [self.env.get(a) for a in n.all_input_nodes]
            for t in pytree.tree_leaves(result):
                if isinstance(t, Tensor):
                    self._hold(t, n.name, first_record if any(t is x for x in inputs) else None)
        return result

    def _hold(self, t: Tensor, name: str, in_place_from: int | None) -> None:
        """Map t's storage to its producer while t lives (once it is freed, its address may be
        reused): the first node whose output lives there (a view is its base's), or the last one
        that wrote its output over its input (an in-place ReLU's output is no longer its input; its
        old value cannot have been saved, autograd would refuse the backward). `in_place_from`: the
        first of the records the in-place node made, None for a node that wrote a new output."""
        key = _storage_key(t)
        if in_place_from is not None:  # what the node saved of it while running is its output too
            self.producers[key] = name
            mine = self.records[in_place_from:]
            self.records[in_place_from:] = [replace(r, producer=name) if r.key == key else r for r in mine]
        else:
            self.producers.setdefault(key, name)
        self._holders[key] += 1
        self._finalizers.append(weakref.finalize(t, self._release, key))

    def _release(self, key: int) -> None:
        self._holders[key] -= 1
        if not self._holders[key]:
            del self._holders[key]
            self.producers.pop(key, None)

    def forget(self) -> None:
        """Drop the outputs and the watch on them: a finalizer on a tensor the caller keeps (the
        input) would keep this interpreter, and through it the model, alive."""
        self.env.clear()
        for finalizer in self._finalizers:
            finalizer.detach()

    def save(self, t: Tensor) -> None:
        key = _storage_key(t)
        self.records.append(Saved(self.current, self.producers.get(key), key, t.untyped_storage().nbytes()))


class _Runner(nn.Module):
    """Lets functional_call swap the graph module's parameters while `run` (the graph module's own
    forward, or an interpreter over it) executes it."""

    def __init__(self, gm: fx.GraphModule, run: Callable[..., object]) -> None:
        super().__init__()
        self.gm = gm
        self.run = run

    def forward(self, *args: Tensor):
        return self.run(*args)


@contextmanager
def _watching_saved(save: Callable[[Tensor], None], excluded: set[int]) -> Iterator[None]:
    """Call save(t) for each tensor autograd saves inside the block whose storage is not excluded."""

    def pack(t: Tensor) -> Tensor:
        if _storage_key(t) not in excluded:
            save(t)
        # Detached: a saved output packed as itself would hold its own grad_fn, a reference cycle
        # through autograd's C++ graph that the garbage collector cannot see.
        return t.detach()

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def _replacement(t: Tensor, analytic: bool, trainable: bool | None) -> Tensor:
    requires_grad = t.requires_grad if trainable is None else (trainable and t.is_floating_point())
    if analytic:
        return torch.empty_like(t, device="meta").requires_grad_(requires_grad)
    return t.detach().requires_grad_(requires_grad)


def _training_state(gm: fx.GraphModule, analytic: bool, train_all: bool) -> dict[str, Tensor]:
    """Stand-ins for gm's parameters and buffers, keyed for functional_call through `_Runner`:
    every parameter trained (vanilla) or each keeping its own requires_grad (Facto). Buffers are
    copies (one per tensor, so shared ones stay shared): a measuring forward in training updates
    batch-norm statistics and batch counts in place, which must not reach the model."""
    trainable = True if train_all else None
    parameters = gm.named_parameters(remove_duplicate=False)
    state = {f"gm.{name}": _replacement(t, analytic, trainable) for name, t in parameters}
    copies: dict[int, Tensor] = {}
    for name, t in gm.named_buffers(remove_duplicate=False):
        if id(t) not in copies:
            copies[id(t)] = _replacement(t, analytic, False) if analytic else t.detach().clone()
        state[f"gm.{name}"] = copies[id(t)]
    return state


def saved_tensors(
    gm: fx.GraphModule,
    inputs: Sequence[Tensor],
    *,
    analytic: bool = False,
    train_all: bool = False,
    estimates: dict[str, Estimate] | None = None,
    input_bytes: dict[str, int] | None = None,
) -> list[Saved]:
    """Every tensor autograd saves for backward in one forward pass of gm, in order, parameters and
    buffers aside.

    train_all=True makes every parameter require grad (vanilla full-rank training); otherwise
    parameters keep their own requires_grad (Facto training). `estimates` maps node names to
    functions of the node's arguments giving its saved bytes where hooks cannot see them.
    `input_bytes`, if given, is filled with each call node's (first) input size: what a dense conv
    or linear keeps for its weight gradient (the HOSVD paper's per-layer activation memory).
    """
    state = _training_state(gm, analytic, train_all)
    excluded = {_storage_key(t) for t in state.values()}
    args = [torch.empty_like(x, device="meta") if analytic else x for x in inputs]
    interpreter = _SavingInterpreter(gm, estimates or {}, input_bytes)
    with _watching_saved(interpreter.save, excluded):
        output = functional_call(_Runner(gm, interpreter.run), state, tuple(args), strict=False, tie_weights=False)
    # The interpreter keeps the output, whose autograd graph holds the pack hook, which holds the
    # interpreter: a cycle through C++ that would keep the model alive.
    interpreter.forget()
    del output
    return [r for r in interpreter.records if r.saver != _ESTIMATED]


def first_saves(records: Iterable[Saved]) -> Iterator[Saved]:
    """The records whose storage no earlier record saved: what the saved bytes are made of."""
    seen: set[int] = set()
    for r in records:
        if r.key not in seen:
            seen.add(r.key)
            yield r


def saved_bytes_by_node(gm: fx.GraphModule, inputs: Sequence[Tensor], **options) -> dict[str, int]:
    """Bytes of unique storages saved for backward, per FX node name, for one forward pass: each
    storage charged to the node that saved it first. `options` are saved_tensors'."""
    counts: dict[str, int] = defaultdict(int)
    for r in first_saves(saved_tensors(gm, inputs, **options)):
        counts[r.saver] += r.nbytes
    return dict(counts)


# A line kineto, the profiler's C++ side, logs: "USDT:2026-01-01 10:00:00 12:12 File.cpp:39] ...".
_KINETO_LINE = re.compile(r"^[A-Z]+:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \w+\.cpp:\d+\] ")


@contextmanager
def _kineto_quiet() -> Iterator[None]:
    """Drop the lines kineto writes to stderr inside the block (its start and stop, and on a machine
    without a GPU a failed device count), passing on anything else written there.

    Kineto writes to file descriptor 2 from C++ and reads KINETO_LOG_LEVEL only when the process
    starts, so the descriptor itself is held in a temporary file while the block runs."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not _KINETO_LINE.match(line)))


def peak_step_bytes(step: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """The most memory held at once while `step()` runs, beyond what was live before it.

    This, not saved bytes, decides whether a batch fits (docs/design.md §5). On CUDA it is
    torch.cuda.max_memory_allocated; on the CPU it is read from the allocator's own events (the
    profiler's memory records: every allocation and free, in order), not from process RSS.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with _kineto_quiet():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events = sorted(
            (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_training_bytes(gm: fx.GraphModule, inputs: Sequence[Tensor], *, train_all: bool = False) -> int:
    """peak_step_bytes of one forward and backward of `gm` (the sum of its outputs as the loss).

    Parameters are trained as in saved_bytes_by_node (train_all=True: every one), on stand-ins,
    so no gradient lands on the model's own parameters.
    """
    state = _training_state(gm, False, train_all)
    runner = _Runner(gm, gm.forward)

    def step() -> None:
        output = functional_call(runner, state, tuple(inputs), strict=False, tie_weights=False)
        losses = [t.float().sum() for t in pytree.tree_leaves(output) if isinstance(t, Tensor) and t.requires_grad]
        torch.autograd.backward(losses)

    return peak_step_bytes(step, inputs[0].device)


def saved_bytes(fn: Callable[..., object], *inputs: Tensor, exclude: Sequence[Tensor] = ()) -> int:
    """Bytes of unique storages autograd saves during one call of `fn(*inputs)`, `exclude` aside.

    The count of `saved_bytes_by_node`, for code that is not a graph: torch.utils.checkpoint's
    reentrant form, for one, saves each segment's input through these hooks.
    """
    storages: dict[int, int] = {}

    def save(t: Tensor) -> None:
        storages[_storage_key(t)] = t.untyped_storage().nbytes()

    with _watching_saved(save, {_storage_key(t) for t in exclude}):
        output = fn(*inputs)
    del output
    return sum(storages.values())
