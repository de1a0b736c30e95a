"""The training loop behind `facto-fx train` and `demo`: full-rank first, then Facto, resumable.

A checkpoint holds everything the numbers depend on (weights, M, D and its draw count, optimizer
and merge-hook state, the RNG, the position in the epoch and its running metrics), so a resumed
run continues bit-identically to one that was never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

import facto_fx
from facto_fx.calibration import batch_norms
from facto_fx.methods import method_layers, method_parameters
from facto_fx.model_zoo import build_model
from facto_fx.presets import method_description
from facto_fx.report import MemoryReport
from facto_fx.training import checkpoint, distributed
from facto_fx.training.config import TrainConfig
from facto_fx.training.data import EpochSampler, load_splits

CHECKPOINT, DENSE, HISTORY = "checkpoint.pt", "model_dense.pt", "history.json"
FULL_RANK, FACTO = "full-rank", "facto"


@dataclass
class EpochRecord:
    epoch: int
    phase: str
    train_loss: float
    train_accuracy: float
    test_accuracy: float
    images_per_s: float
    merges: int


@dataclass
class TrainResult:
    config: TrainConfig
    history: list[EpochRecord]
    model: nn.Module
    report: MemoryReport | None = None
    out: Path | None = None

    @property
    def test_accuracy(self) -> float:
        return self.history[-1].test_accuracy


@dataclass
class _Position:
    """Where the run is, and the running sums of the epoch in progress."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    phase: str = FULL_RANK
    switched_at: int | None = None  # the epoch Facto started at (None: not yet, or a checkpoint from before)
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss·n, correct, n


class Trainer:
    """One run of `TrainConfig`; `fit()` trains, checkpoints, and exports the dense model."""

    def __init__(self, config: TrainConfig, on_step: Callable[[int], None] | None = None) -> None:
        self.config = config
        self.on_step = on_step
        self.topology, self.device = distributed.setup(config.device)
        self.out = Path(config.out) if config.out else None
        self.data = load_splits(config.dataset, config.data_dir, config.download, config.image_size, config.seed)
        self.sampler = EpochSampler(len(self.data.train), config.seed, self.topology.rank, self.topology.world_size)
        # Its own generator: each pass's iterator draws its workers' base seed from it, not from torch's,
        # so a run resumed mid-epoch draws the codes' stochastic rounding where the unbroken run did.
        self.train_loader = DataLoader(
            self.data.train, batch_size=config.batch_size, sampler=self.sampler, num_workers=config.workers,
            generator=torch.Generator().manual_seed(config.seed),
        )
        shard = range(self.topology.rank, len(self.data.test), self.topology.world_size)
        self.test_loader = DataLoader(Subset(self.data.test, shard), batch_size=256, num_workers=config.workers)
        self.steps_per_epoch = min(len(self.train_loader), config.limit_batches or math.inf)
        self.position = _Position()
        self.history: list[EpochRecord] = []
        self.hooks: facto_fx.FactoHooks | None = None
        self._last_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.report: MemoryReport | None = None
        self.amp_dtype = _amp_dtype(self.device) if config.amp else None
        if self.amp_dtype == torch.bfloat16 and self.device.type == "cpu" and not _fast_cpu_bf16():
            warnings.warn("--amp: this CPU has no bf16 instructions (AVX512-BF16 / AMX); bf16 autocast is emulated "
                          "and will likely be slower than fp32", stacklevel=2)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        torch.manual_seed(config.seed)
        self.raw = build_model(config.model, num_classes=self.data.num_classes).to(self.device)
        self.clip = config.clip_for(has_batch_norm=bool(batch_norms(self.raw)))
        self._build_full_rank()

    # -- building ---------------------------------------------------------------------------

    def _build_full_rank(self) -> None:
        self.optimizer = self._optimizer([{"params": list(self.raw.parameters())}])
        self.model = self._wrap(self.raw, broadcast_buffers=True)

    def _switch_to_facto(self, epoch: int, recalibrate: bool = True) -> None:
        """Compile the full-rank model for Facto, which starts at `epoch`; a fresh optimizer over M
        and the other trainables.

        Batch-norm statistics are frozen from here on, so they are first re-estimated on the
        current weights: the running averages lag the weights by many steps after a short FRT.
        """
        config = self.config
        if recalibrate:
            self._recalibrate_batch_norm()
        fmodel = facto_fx.compile(self.raw, config.facto_config())
        low_rank = method_parameters(fmodel)
        low_rank_ids = {id(p) for p in low_rank}
        others = [p for p in fmodel.parameters() if p.requires_grad and id(p) not in low_rank_ids]
        # W is regularised by the hooks (paper eq. 14), not by decaying M.
        self.optimizer = self._optimizer([{"params": low_rank, "weight_decay": 0.0, "lr_scale": config.low_rank_lr},
                                          {"params": others}])
        merge_every = config.merge_every or self.steps_per_epoch
        w_decay = config.lr_at(epoch, epoch) * config.weight_decay
        probe = self._probe_loss if config.direction == "gradient" else None
        self.raw = fmodel
        # apply ratio 0 may rewrite no layer a method acts on after steps: nothing to attach
        self.hooks = (facto_fx.attach(fmodel, self.optimizer, merge_every, w_decay, probe)
                      if method_layers(fmodel) else None)
        # Frozen statistics and deterministic D: no buffer needs broadcasting once Facto is on; batch
        # statistics keep updating running averages, which rank 0 broadcasts as for the dense model.
        self.model = self._wrap(fmodel, broadcast_buffers=config.facto_batch_norm != "freeze")
        self.position.phase, self.position.switched_at = FACTO, epoch
        if self.topology.is_main:
            x = torch.empty(self.config.batch_size, 3, self.data.image_size, self.data.image_size, device="meta")
            self.report = facto_fx.report(fmodel, x, analytic=True)
            print(f"Facto on: {_memory_line(self.report)}")

    def _probe_loss(self) -> torch.Tensor:
        """The loss on a quarter of the last training batch (the first of the data set before any),
        where gradient directions come from."""
        x, y = self._last_batch or next(iter(DataLoader(self.data.train, batch_size=self.config.batch_size)))
        size = max(1, len(y) // 4)
        with self._autocast():
            return F.cross_entropy(self.raw(x[:size].to(self.device)), y[:size].to(self.device))

    def _measured_report(self) -> MemoryReport:
        """The report on a real training batch, for methods whose saved size depends on the data
        (the analytic report, which said so in its notes, counts them at their worst). The report
        runs on copies of the buffers, so the trained model's statistics do not move."""
        size = min(self.config.batch_size, len(self.data.train))
        x = next(iter(DataLoader(Subset(self.data.train, range(size)), batch_size=size)))[0].to(self.device)
        return facto_fx.report(self.raw, x)

    def _recalibrate_batch_norm(self) -> None:
        """Statistics of the current weights before compile freezes them (one epoch of batches),
        averaged over the processes."""
        if self.config.facto_batch_norm != "freeze":
            return
        self._set_epoch(self.position.epoch)
        with self._autocast():
            facto_fx.recalibrate_batch_norm(self.raw, islice(self.train_loader, self.steps_per_epoch),
                                            device=self.device, progress=self.config.progress and self.topology.is_main)
        self._average_statistics()

    def _average_statistics(self) -> None:
        """Every batch-norm's running statistics averaged over the processes (as timm's
        distribute_bn): each process updates them on its own batches, so without this the ranks
        evaluate and checkpoint different models."""
        names = ("running_mean", "running_var")
        distributed.average_buffers([b for name, b in self.raw.named_buffers() if name.endswith(names)],
                                    self.topology)

    def _optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        """SGD or AdamW over `groups`, each split so that its 1-element parameters train at
        `scalar_lr` times the rate (group key "lr_scale", kept through the schedule)."""
        config = self.config
        groups = [split for group in groups for split in _split_scalars(group, config.scalar_lr) if split["params"]]
        for group in groups:
            group["lr"] = config.lr * group["lr_scale"]
        if config.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)

    def _wrap(self, module: nn.Module, broadcast_buffers: bool) -> nn.Module:
        wrapped = distributed.wrap(module, self.topology, self.device, broadcast_buffers)
        return torch.compile(wrapped) if self.config.compile else wrapped

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "format": 2,
            "config": dataclasses.asdict(self.config),
            "position": dataclasses.asdict(self.position),
            "model": self.raw.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "hooks": self.hooks.state_dict() if self.hooks else None,
            "method_state": facto_fx.method_state(self.raw) if self.position.phase == FACTO else None,
            "scaler": self.scaler.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "history": [dataclasses.asdict(r) for r in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        saved = dict(state["config"])
        if state.get("format", 1) < 2 and saved.get("batch_norm") == "auto":  # "auto" meant another mode then
            fields = {f.name for f in dataclasses.fields(TrainConfig)}
            saved["batch_norm"] = TrainConfig(**{k: v for k, v in saved.items() if k in fields}
                                              ).batch_norm_before_lossy_default()
        saved.setdefault("activation_bits", None)  # runs from before the codes left activations as they were
        saved.setdefault("store_bits", None)  # and from before the store, the maps it takes
        conflicts = self.config.conflicts_with(saved)
        if conflicts:
            changes = ", ".join(f"{k}: {saved[k]!r} -> {self.config.resolved(k)!r}" for k in conflicts)
            raise ValueError(f"cannot resume: options differ from the checkpoint's ({changes})")
        position = _Position(**state["position"])
        if position.phase == FACTO:
            if position.switched_at is None:  # a checkpoint from before switch "auto": it switched at frt_epochs
                position.switched_at = self.config.frt_epochs
            self._switch_to_facto(position.switched_at, recalibrate=False)
        self.raw.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.hooks is not None:
            self.hooks.load_state_dict(state["hooks"])
        if state.get("method_state"):  # absent from checkpoints written before it existed
            facto_fx.load_method_state(self.raw, state["method_state"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.history = [EpochRecord(**r) for r in state["history"]]
        self.position = position

    def save_checkpoint(self) -> None:
        if self.out is not None and self.topology.is_main:
            checkpoint.save_atomic(self.state_dict(), self.out / CHECKPOINT)

    def _restore_or_start(self) -> None:
        path = self.out / CHECKPOINT if self.out else None
        if path is not None and path.exists():
            if not self.config.resume:
                raise ValueError(f"{path} exists; pass --resume to continue that run, or choose another --out")
            self.load_state_dict(checkpoint.load(path))
            if self.topology.is_main:
                print(f"resumed from {path}: epoch {self.position.epoch} of {self.config.epochs} done "
                      f"({self.position.phase} phase, step {self.position.global_step})")
        elif self.config.resume:
            raise ValueError(f"--resume: no checkpoint at {path} to continue from")

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train to `config.epochs`, checkpointing each epoch, then export the dense model."""
        try:
            if self.topology.is_main:
                print(run_header(self.config, self.device, self.clip))
            self._restore_or_start()
            while self.position.epoch < self.config.epochs:
                if self._switch_due():
                    self._switch_to_facto(self.position.epoch)
                rate = self.config.lr_at(self.position.epoch, self._switched_at())
                for group in self.optimizer.param_groups:
                    group["lr"] = rate * group["lr_scale"]
                self._train_epoch()
            never_started = self.position.phase == FULL_RANK and self.config.frt_epochs < self.config.epochs
            if never_started and self.topology.is_main:
                warnings.warn("Facto never started: the full-rank training loss stayed above half of chance "
                              "before every epoch Facto could have started at, so this run was full-rank "
                              "throughout; train longer (--epochs), faster (--lr), or switch regardless "
                              "(--switch fixed)", stacklevel=2)
            if self.report is not None and self.report.notes and self.topology.is_main:
                self.report = self._measured_report()
                print(f"measured on a training batch: {_memory_line(self.report)}")
            self._export()
        finally:
            distributed.teardown(self.topology)
        return TrainResult(self.config, self.history, self.raw, self.report, self.out)

    def _switched_at(self) -> int:
        """The epoch Facto started at; `epochs` while it has not (the schedule's drop waits for it)."""
        switched = self.position.switched_at
        return self.config.epochs if switched is None else switched

    def _switch_due(self) -> bool:
        """Whether Facto starts at this epoch: from frt_epochs on, unless switch "auto" waits for
        full-rank training to leave chance (the same verdict on every process: the loss is summed
        over them). A switch that goes ahead anyway is warned about, as is one at the full learning
        rate with frozen statistics or unbiased steps."""
        epoch, config = self.position.epoch, self.config
        if self.position.phase != FULL_RANK or epoch < config.frt_epochs:
            return False
        untrained = near_chance(self.history, self.data.num_classes) if config.frt_epochs else None
        if untrained and config.switch == "auto":
            if self.topology.is_main:
                print(f"Facto waits: {untrained} (--switch fixed starts it regardless)")
            return False
        if self.topology.is_main:
            problems = (untrained and f"low-rank training starts although {untrained}: it will lose accuracy; train "
                        "full-rank longer (--frt-epochs, or --switch auto to wait) or faster (--lr)",
                        frozen_at_full_rate(config, epoch, len(batch_norms(self.raw))),
                        large_steps_at_full_rate(config, epoch))
            for problem in filter(None, problems):
                warnings.warn(problem, stacklevel=3)
        return True

    def _set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The order and, for data sets that augment (RandomCrops), the augmentation of `epoch`."""
        self.sampler.set_epoch(epoch, skip)
        if hasattr(self.data.train, "set_epoch"):
            self.data.train.set_epoch(epoch)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _train_epoch(self) -> None:
        position, config = self.position, self.config
        self._set_epoch(position.epoch, skip=position.step_in_epoch * config.batch_size)
        batches = islice(self.train_loader, self.steps_per_epoch - position.step_in_epoch)
        bar = _progress(
            batches, self.steps_per_epoch, position.step_in_epoch,
            f"epoch {position.epoch + 1}/{config.epochs} {position.phase}", config.progress and self.topology.is_main,
        )
        self.model.train()
        start, images = time.perf_counter(), 0
        for x, y in bar:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            self._last_batch = x, y
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                logits = self.model(x)
                loss = F.cross_entropy(logits, y)
            self.scaler.scale(loss).backward()
            self._clip_gradients()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            position.sums[0] += loss.item() * len(y)
            position.sums[1] += (logits.argmax(1) == y).sum().item()
            position.sums[2] += len(y)
            position.step_in_epoch += 1
            position.global_step += 1
            images += len(y)
            rate = images * self.topology.world_size / (time.perf_counter() - start)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{position.sums[1] / position.sums[2]:.3f}",
                                img_s=f"{rate:.0f}")
            if config.checkpoint_every and position.global_step % config.checkpoint_every == 0:
                self.save_checkpoint()
            if self.on_step is not None:
                self.on_step(position.global_step)
        self._average_statistics()
        loss_sum, correct, seen = distributed.all_sum(position.sums, self.topology, self.device)
        self.history.append(EpochRecord(
            position.epoch + 1, position.phase, loss_sum / seen, correct / seen, self.evaluate(),
            images * self.topology.world_size / (time.perf_counter() - start), self.hooks.merges if self.hooks else 0,
        ))
        if self.topology.is_main:
            _print_epoch(self.history[-1])
            if position.phase == FACTO:
                for line in facto_fx.method_summaries(self.raw):
                    print(f"  {line}")
        self.position = dataclasses.replace(position, epoch=position.epoch + 1, step_in_epoch=0, sums=[0.0, 0.0, 0.0])
        self.save_checkpoint()

    def _clip_gradients(self) -> None:
        """Clip the global gradient norm to `clip` (TrainConfig.clip_for), unscaled first under fp16
        loss scaling."""
        if not self.clip:
            return
        self.scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.clip)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Test accuracy over all processes' shards of the test set."""
        self.raw.eval()
        correct = seen = 0
        for x, y in islice(self.test_loader, self.config.limit_batches):
            with self._autocast():
                correct += (self.raw(x.to(self.device)).argmax(1).cpu() == y).sum().item()
            seen += len(y)
        correct, seen = distributed.all_sum([correct, seen], self.topology, self.device)
        return correct / seen

    def _export(self) -> None:
        if self.out is None or not self.topology.is_main:
            return
        dense = facto_fx.export_dense(self.raw) if self.position.phase == FACTO else self.raw
        state = {"model": self.config.model, "num_classes": self.data.num_classes, "state_dict": dense.state_dict()}
        checkpoint.save_atomic(state, self.out / DENSE)
        (self.out / HISTORY).write_text(json.dumps([dataclasses.asdict(r) for r in self.history], indent=1))


def _split_scalars(group: dict, scalar_lr: float) -> list[dict]:
    """`group` as two: its 1-element parameters (Fixup's scalar biases and multipliers) with
    lr_scale `scalar_lr`, the rest with 1. The Fixup paper trains the scalars at a tenth of the rate;
    at the full rate they shifted a fixup_resnet18's features to an input-independent constant on
    some seeds, and the loss never left chance (benchmarks/train_defaults.py)."""
    params = list(group["params"])
    scalars = [p for p in params if p.numel() == 1]
    rest = [p for p in params if p.numel() != 1]
    scale = group.get("lr_scale", 1.0)
    return [{**group, "params": rest, "lr_scale": scale}, {**group, "params": scalars, "lr_scale": scale * scalar_lr}]


def near_chance(history: list[EpochRecord], num_classes: int) -> str | None:
    """What says full-rank training has not learned yet: its last epoch's training loss still above
    half of chance (ln classes / 2), or no full-rank epoch at all.

    Low-rank training moves W only within the few directions D spans between merges, so it
    cannot catch up from weights near chance: measured with benchmarks/train_defaults.py, a VGG
    without batch-norm switched while its loss was still ln(classes) ended far below vanilla,
    and closer to it switched once its loss had halved.
    """
    chance = math.log(num_classes)
    if not history:
        return "no full-rank training yet"
    loss = history[-1].train_loss
    if loss < chance / 2:
        return None
    return (f"the full-rank training loss after epoch {history[-1].epoch} is {loss:.2f}, above half of chance "
            f"(ln {num_classes} / 2 = {chance / 2:.2f})")


def frozen_at_full_rate(config: TrainConfig, switch: int, batch_norm_layers: int) -> str | None:
    """Why frozen batch-norm statistics will fail, if Facto starts at epoch `switch` at the full
    learning rate.

    Frozen statistics cannot follow weights that still move fast: measured with
    benchmarks/switch_regimes.py, cifar_vgg11_bn switched after one epoch on digits at the full
    learning rate diverged (chance) with them, and matched vanilla with batch statistics.
    """
    start = _full_rate_start(config, switch)
    if not (start and batch_norm_layers and config.batch_norm == "freeze"):
        return None
    return (f"{start}, with {batch_norm_layers} batch-norm layers' statistics frozen: "
            "at the full rate they diverged in our measurements (benchmarks/switch_regimes.py); drop the rate where "
            "Facto starts (--lr-milestones, the default) or keep batch statistics (--batch-norm lossy, which saves "
            "what frozen statistics save, with --scale paper --low-rank-lr 1 at the full rate)")


def large_steps_at_full_rate(config: TrainConfig, switch: int) -> str | None:
    """Why M's steps may diverge, if Facto starts at epoch `switch` at the full learning rate with
    D scaled for unbiased steps.

    An unbiased step on M moves Ω along D's R directions I/R times as far as full-rank SGD would
    (30x for a 3x3 conv at INR 0.3), which the low-rank rate multiplies: measured with
    benchmarks/switch_regimes.py --regimes same, cifar_vgg11_bn on digits switched after one epoch
    at the full rate went to chance (0.078) with the defaults, and beat vanilla (0.989 against
    0.975) with the paper's scale and M at the same rate.
    """
    start = _full_rate_start(config, switch)
    if not (start and config.scale == "unbiased"):
        return None
    return (f"{start}, with D scaled for unbiased steps (--scale unbiased) and M at "
            f"{config.low_rank_lr:g}x the rate: at the full rate such steps diverged in our measurements "
            "(benchmarks/switch_regimes.py --regimes same); drop the rate where Facto starts (--lr-milestones, the "
            "default) or take smaller steps (--scale paper --low-rank-lr 1)")


def _full_rate_start(config: TrainConfig, switch: int) -> str | None:
    """What the warnings say when Facto starts at epoch `switch` at the full learning rate; None
    when it starts at a dropped rate or does not start."""
    if not 0 < switch < config.epochs or config.rate_lowered_at(switch):
        return None
    return (f"Facto starts at learning rate {config.lr_at(switch, switch):g}, no lower than full-rank training's "
            f"{config.lr:g}")


def train(config: TrainConfig, on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Run `config` to completion (resuming from `config.out` with `config.resume`)."""
    return Trainer(config, on_step).fit()


def _amp_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device supports it (CPU, recent GPUs), else fp16 with loss scaling."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _fast_cpu_bf16() -> bool:
    """Whether the CPU computes bf16 natively (torch's own CPU capability checks)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def _progress(batches, total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, total=total, initial=initial, desc=desc, unit="batch", leave=False, dynamic_ncols=True)


def run_header(config: TrainConfig, device: torch.device, clip: float = 0.0) -> str:
    """The line `train` opens with: model, data, schedule, method, and where Facto starts."""
    method = method_description(config.method, config.eps, config.last, config.eb, config.sigma,
                                config.strips, config.strip_mode)
    if config.frt_epochs >= config.epochs:
        schedule = "full-rank throughout"
    else:
        at_least = "at least " if config.switch == "auto" and config.frt_epochs else ""
        schedule = (f"{at_least}{config.frt_epochs} full-rank, then Facto (INR {config.inr}, lossy kernel "
                    f"{config.lossy_kernel}, apply ratio {config.apply_ratio}{method})")
    return (f"{config.model} on {config.dataset}, {config.epochs} epochs: {schedule}; "
            f"batch {config.batch_size}, lr {config.lr}, {config.optimizer}"
            + (f", gradient norm clipped to {clip:g}" if clip else "")
            + f", {device}"
            + (", autocast" if config.amp else "") + _switch_guidance(config))


def _switch_guidance(config: TrainConfig) -> str:
    """Where Facto starts against the paper's regime, and what that means for accuracy."""
    if config.frt_epochs >= config.epochs:
        return ""
    share = config.frt_epochs / config.epochs
    if share >= 0.3:
        wait = " (later while full-rank training is near chance)" if config.switch == "auto" else ""
        return (f"\nFacto starts after {share:.0%} of the epochs{wait}, as in the paper (from 30 %): expect "
                "vanilla's accuracy once full-rank training has left chance (docs/usage.md, 'When to compile')")
    return (f"\nFacto starts after {share:.0%} of the epochs, earlier than the paper's 30 %: expect less than "
            "vanilla's accuracy, the more so the less full-rank training has learned "
            "(docs/usage.md, 'When to compile')")


def _memory_line(report: MemoryReport) -> str:
    return (f"feature maps saved for backward per batch, vanilla {report.vanilla_bytes / 2**20:.1f} MiB -> "
            f"Facto {report.facto_bytes / 2**20:.1f} MiB ({100 * report.ratio:.1f} %)")


def _print_epoch(record: EpochRecord) -> None:
    print(
        f"epoch {record.epoch} ({record.phase}): train loss {record.train_loss:.4f}, "
        f"train acc {record.train_accuracy:.3f}, test acc {record.test_accuracy:.3f}, "
        f"{record.images_per_s:.0f} img/s, {record.merges} merges"
    )



