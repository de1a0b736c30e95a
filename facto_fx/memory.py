"""Saved bytes: what autograd keeps for backward during one forward pass (docs/design.md §5).

Every tensor autograd saves passes through `saved_tensors_hooks`; we count the unique storages,
excluding parameters and buffers, and charge each to the FX node that saved it first. With
`analytic=True` the model's parameters and the inputs are swapped for meta tensors, so the same
figures come out for batch 256 at 224² without allocating them.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, fx, nn
from torch.func import functional_call
from torch.utils import _pytree as pytree


def _storage_key(t: Tensor) -> int:
    return t.untyped_storage()._cdata


Estimate = Callable[[tuple, dict], "int | None"]
_ESTIMATED = "<estimated>"  # where hooks charge what a node with an estimate saves


class _SavingInterpreter(fx.Interpreter):
    """Runs the graph node by node so every saved tensor can be charged to its node.

    A node with an estimate (a method whose saved size hooks cannot see) is charged the estimate
    computed from its arguments instead, unless the estimate is None. `input_bytes`, if given,
    gets the size of every call node's first tensor argument.
    """

    current = "<input>"

    def __init__(
        self, gm: fx.GraphModule, estimates: dict[str, Estimate], counts: dict[str, int],
        input_bytes: dict[str, int] | None,
    ) -> None:
        super().__init__(gm)
        self.estimates, self.counts, self.input_bytes = estimates, counts, input_bytes

    def run_node(self, n: fx.Node):
        self.current = n.name
        estimate = self.estimates.get(n.name)
        if (estimate is not None or self.input_bytes is not None) and n.op.startswith("call"):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if self.input_bytes is not None and args and isinstance(args[0], Tensor):
                self.input_bytes[n.name] = args[0].nelement() * args[0].element_size()
            nbytes = None if estimate is None else estimate(args, kwargs)
            if nbytes is not None:
                self.counts[n.name] += nbytes
                self.current = _ESTIMATED
        return super().run_node(n)


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
def _counting_saved(counts: dict[str, int], excluded: set[int], owner: Callable[[], str]) -> Iterator[None]:
    """Add the bytes of each storage autograd saves inside the block, once, to counts[owner()]."""
    seen: set[int] = set()

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key not in excluded and key not in seen:
            seen.add(key)
            counts[owner()] += t.untyped_storage().nbytes()
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


def saved_bytes_by_node(
    gm: fx.GraphModule,
    inputs: Sequence[Tensor],
    *,
    analytic: bool = False,
    train_all: bool = False,
    estimates: dict[str, Estimate] | None = None,
    input_bytes: dict[str, int] | None = None,
) -> dict[str, int]:
    """Bytes of unique storages saved for backward, per FX node name, for one forward pass.

    train_all=True makes every parameter require grad (vanilla full-rank training); otherwise
    parameters keep their own requires_grad (Facto training). `estimates` maps node names to
    functions of the node's arguments giving its saved bytes where hooks cannot see them.
    `input_bytes`, if given, is filled with each call node's (first) input size: what a dense conv
    or linear keeps for its weight gradient, counted per layer even where another node saved the
    same tensor first (the HOSVD paper's per-layer activation memory).
    """
    state = _training_state(gm, analytic, train_all)
    excluded = {_storage_key(t) for t in state.values()}
    args = [torch.empty_like(x, device="meta") if analytic else x for x in inputs]
    counts: dict[str, int] = defaultdict(int)
    interpreter = _SavingInterpreter(gm, estimates or {}, counts, input_bytes)
    with _counting_saved(counts, excluded, lambda: interpreter.current):
        output = functional_call(_Runner(gm, interpreter.run), state, tuple(args), strict=False, tie_weights=False)
    # The interpreter keeps the output, whose autograd graph holds the pack hook, which holds the
    # interpreter: a cycle through C++ that would keep the model alive.
    interpreter.env.clear()
    del output
    counts.pop(_ESTIMATED, None)
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


def total(counts: dict[str, int]) -> int:
    return sum(counts.values())


def saved_bytes(fn: Callable[..., object], *inputs: Tensor, exclude: Sequence[Tensor] = ()) -> int:
    """Bytes of unique storages autograd saves during one call of `fn(*inputs)`, `exclude` aside.

    The count of `saved_bytes_by_node`, for code that is not a graph: torch.utils.checkpoint's
    reentrant form, for one, saves each segment's input through these hooks.
    """
    counts: dict[str, int] = defaultdict(int)
    with _counting_saved(counts, {_storage_key(t) for t in exclude}, lambda: "call"):
        output = fn(*inputs)
    del output
    return total(counts)
