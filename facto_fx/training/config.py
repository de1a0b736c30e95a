"""TrainConfig: every option of `facto-fx train`, validated before anything is built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from facto_fx.config import FactoConfig
from facto_fx.presets import auto_batch_norm, method_options
from facto_fx.training.data import DATASETS

OPTIMIZERS = ("sgd", "adamw")
SWITCHES = ("auto", "fixed")
#: Options that may differ between a run and its resumption (they do not change the numbers).
RESUMABLE_CHANGES = frozenset({"epochs", "device", "out", "resume", "checkpoint_every", "progress", "workers"})


@dataclass(frozen=True)
class TrainConfig:
    """A training run: full-rank for `frt_epochs`, then Facto low-rank training until `epochs`.

    frt_epochs == epochs trains full-rank throughout (the vanilla baseline). The defaults (10
    epochs, 3 full-rank, lr 0.05) measured best of those tried in benchmarks/train_defaults.py.
    switch "auto" makes frt_epochs the earliest switch: while the last full-rank epoch's training
    loss is still above half of chance (ln classes / 2), Facto waits an epoch more, because
    low-rank training cannot catch up from weights that have not learned yet (models without
    batch-norm may still be near chance after 3 epochs on digits); "fixed" switches at frt_epochs
    regardless, and warns. frt_epochs 0 (no full-rank phase) never waits. The learning rate is
    multiplied by lr_gamma at each epoch in lr_milestones; by default once, where Facto starts, as
    in the paper (FRT ends at a learning-rate drop). clip_grad_norm clips the gradients' global
    norm before each step (`clip_for`), and 1-element parameters (Fixup's scalars) train at
    scalar_lr times the rate: without either, models without batch-norm sat at chance on some
    seeds. merge_every counts optimizer steps (default: one epoch). limit_batches caps the batches
    per epoch, train and test, for quick checks.
    batch_norm "auto" is compile's default, batch statistics ("lossy"), or frozen statistics for
    method "rowstrips" (presets.auto_batch_norm): on a task that was not saturated, frozen
    statistics lost 1.5-3 points even where Facto starts at a dropped learning rate
    (benchmarks/accuracy.py). low_rank_lr multiplies the learning rate of Facto's M: 4 closed most
    of the rest of the gap there (M starts at zero after every merge, and with the rate dropped ×0.1
    at the switch it learned too slowly at 1); at the full rate it diverges with scale "unbiased"
    (the trainer warns: trainer.large_steps_at_full_rate).
    """

    model: str = "cifar_vgg11_bn"
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    image_size: int | None = None
    epochs: int = 10
    frt_epochs: int = 3
    switch: Literal["auto", "fixed"] = "auto"
    batch_size: int = 64
    lr: float = 0.05
    lr_milestones: tuple[int, ...] | None = None
    lr_gamma: float = 0.1
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    clip_grad_norm: float | None = None
    scalar_lr: float = 0.1
    inr: float = FactoConfig.inr
    lossy_kernel: int = FactoConfig.lossy_kernel
    apply_ratio: float = FactoConfig.apply_ratio
    storage_dtype: str | None = None
    direction: Literal["gaussian", "orthonormal", "gradient"] = FactoConfig.direction
    scale: Literal["unbiased", "paper"] = FactoConfig.scale
    low_rank_lr: float = 4.0
    activation_bits: int | None = FactoConfig.activation_bits
    store_bits: int | None = FactoConfig.store_bits
    batch_norm: Literal["auto", "freeze", "lossy", "train"] = "auto"
    method: Literal["facto", "hosvd", "svd", "eb", "rowstrips"] = "facto"
    eps: float = 0.8
    last: int = 4
    eb: float = 0.02
    sigma: float = 0.1
    strips: int = 8
    strip_mode: Literal["two_phase", "overlap"] = "two_phase"
    merge_every: int | None = None
    amp: bool = False
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    out: str | None = None
    resume: bool = False
    checkpoint_every: int | None = None
    limit_batches: int | None = None
    workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; valid names: {', '.join(DATASETS)}")
        if self.switch not in SWITCHES:
            raise ValueError(f"unknown switch {self.switch!r}; valid names: {', '.join(SWITCHES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid names: {', '.join(OPTIMIZERS)}")
        for name in ("epochs", "batch_size"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("frt_epochs", self.frt_epochs, minimum=0)
        if self.frt_epochs > self.epochs:
            raise ValueError(f"frt_epochs ({self.frt_epochs}) cannot exceed epochs ({self.epochs})")
        for name in ("merge_every", "checkpoint_every", "limit_batches", "image_size"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        _check_int("workers", self.workers, minimum=0)
        _check_int("last", self.last, minimum=1)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr!r}")
        if self.lr_milestones is not None:
            if isinstance(self.lr_milestones, (str, int)) or not all(
                isinstance(m, int) and 0 < m < self.epochs for m in self.lr_milestones
            ):
                raise ValueError(f"lr_milestones must be epochs in (0, {self.epochs}); got {self.lr_milestones!r}")
            object.__setattr__(self, "lr_milestones", tuple(self.lr_milestones))
        if not 0 < self.lr_gamma <= 1:
            raise ValueError(f"lr_gamma must be in (0, 1]; got {self.lr_gamma!r}")
        if not (self.momentum >= 0 and self.weight_decay >= 0):
            raise ValueError("momentum and weight_decay must be >= 0")
        if not self.low_rank_lr > 0:
            raise ValueError(f"low_rank_lr must be > 0; got {self.low_rank_lr!r}")
        if not 0 < self.scalar_lr <= 1:
            raise ValueError(f"scalar_lr must be in (0, 1]; got {self.scalar_lr!r}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm >= 0:
            raise ValueError(f"clip_grad_norm must be >= 0 (0 turns clipping off); got {self.clip_grad_norm!r}")
        if self.resume and self.out is None:
            raise ValueError("resume needs out: the folder whose checkpoint.pt to continue from")
        self.facto_config()

    def facto_config(self) -> FactoConfig:
        """Facto by apply_ratio; with method "hosvd" / "svd", that decomposition on the last `last`
        conv layers as well (Facto in front, the decomposition at the back); with "eb",
        ErrorBounded for every layer Facto leaves; with "rowstrips", row strips from the input
        (presets.method_options)."""
        return FactoConfig(
            inr=self.inr, lossy_kernel=self.lossy_kernel, apply_ratio=self.apply_ratio,
            storage_dtype=self.storage_dtype, direction=self.direction, scale=self.scale,
            batch_norm=self.facto_batch_norm, activation_bits=self.activation_bits,
            store_bits=self.store_bits, seed=self.seed,
            **method_options(self.method, self.eps, self.last, self.eb, self.sigma, self.strips, self.strip_mode),
        )

    @property
    def facto_batch_norm(self) -> str:
        """compile's batch_norm: batch_norm, with "auto" as presets.auto_batch_norm picks for the method."""
        return auto_batch_norm(self.method) if self.batch_norm == "auto" else self.batch_norm

    def batch_norm_before_lossy_default(self) -> str:
        """What "auto" picked in checkpoints written before it meant compile's default (format 1):
        frozen statistics where Facto started below the initial learning rate, else lossy."""
        if self.batch_norm != "auto":
            return self.batch_norm
        return "freeze" if self.rate_lowered_at(self.frt_epochs) else "lossy"

    def rate_lowered_at(self, switch: int) -> bool:
        """Whether Facto starting at epoch `switch` trains below the initial learning rate, after
        full-rank training (the paper's switch, at a learning-rate drop)."""
        return 0 < switch < self.epochs and self.lr_at(switch, switch) < self.lr

    def clip_for(self, has_batch_norm: bool) -> float:
        """The gradient-norm clip of a model (0: none): clip_grad_norm, or by default 1.0 for models
        without batch-norm and none for the rest. Without it cifar_vgg11 sat at chance on one seed in
        three on digits, vanilla and Facto alike; with it mobilenet_v2 learned slower, Facto waited
        until epochs 5 to 7 and lost 7 points (benchmarks/train_defaults.py)."""
        if self.clip_grad_norm is not None:
            return self.clip_grad_norm
        return 0.0 if has_batch_norm else 1.0

    @property
    def milestones(self) -> tuple[int, ...]:
        """The planned schedule's drops: lr_milestones, or by default frt_epochs, the earliest switch
        (none without a Facto phase)."""
        return self.milestones_for(self.frt_epochs)

    def milestones_for(self, switched_at: int) -> tuple[int, ...]:
        """The drops of a run whose Facto phase starts at epoch `switched_at` (`epochs`: never):
        lr_milestones, or by default that epoch, so that a switch "auto" delays until the model has
        learned also delays the drop (at the planned drop, fixup_resnet18 was still near chance on
        digits, and at a tenth of the rate it stayed there for epochs)."""
        if self.lr_milestones is not None:
            return self.lr_milestones
        return (switched_at,) if 0 < switched_at < self.epochs else ()

    def lr_at(self, epoch: int, switched_at: int | None = None) -> float:
        """The learning rate of a 0-based epoch, Facto starting at `switched_at` (None: frt_epochs)."""
        drops = self.milestones_for(self.frt_epochs if switched_at is None else switched_at)
        return self.lr * self.lr_gamma ** sum(epoch >= m for m in drops)

    def conflicts_with(self, saved: dict) -> list[str]:
        """Options that differ from a checkpoint's and would change the run's numbers. Options are
        compared as resolved ("auto" batch-norm as the mode it picks), so a checkpoint written
        before a default became "auto" resumes where the run is the same."""
        fields = sorted(f for f in {f.name for f in dataclasses.fields(self)} - RESUMABLE_CHANGES if f in saved)
        theirs = dataclasses.replace(self, **{f: saved[f] for f in fields})
        return [f for f in fields if theirs.resolved(f) != self.resolved(f)]

    def resolved(self, option: str) -> object:
        """An option's value as the run uses it ("auto" batch-norm as the mode it means)."""
        return self.facto_batch_norm if option == "batch_norm" else getattr(self, option)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
