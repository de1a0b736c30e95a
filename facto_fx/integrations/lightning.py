"""PyTorch Lightning: `FactoCallback` switches a LightningModule's network to Facto at a given epoch.

    pip install "facto-fx[lightning]"

The LightningModule keeps its network in an attribute (`self.model` by default, `attribute=` names
another) and calls it in its steps; `configure_optimizers` returns one optimizer, as for any run:

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = torchvision.models.resnet18(num_classes=10)
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.model(x), y)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    facto = FactoCallback(start_epoch=3, export_path="resnet18_dense.pt")
    L.Trainer(max_epochs=10, callbacks=[facto]).fit(Classifier(), train_loader)

At the start of epoch `start_epoch` (the learning-rate drop, about 30 % into the run) the callback

1. takes `calibration_batches` batches from the train dataloader (moved to the module's device by
   its batch-transfer hooks) and `facto_fx.compile`s the network with them: the Facto model, which
   shares the network's weights, replaces the attribute;
2. replaces the optimizer `configure_optimizers` built by one of the same class and hyperparameters:
   each group's rate times `lr_scale` (0.1: the drop) and the weights W that Facto freezes left out,
   plus a last group for the M matrices at `low_rank_lr` times the rate, without weight decay (the
   hooks decay W instead, paper eq. 14); M's group copies the group that held the first compressed
   layer's weight. Learning-rate schedulers move to the new optimizer and go on where they were,
   their base rates scaled the same way (a scheduler that already drops the rate at `start_epoch`
   wants `lr_scale=1.0`);
3. `facto_fx.attach`es the hooks that merge W <- W + M·D every `merge_every` optimizer steps (one
   epoch's steps by default).

When training ends, `export_dense` gives the network's own class with the merges applied
(`callback.dense_model`), saved as a state_dict to `export_path` if given.

Checkpoints Lightning writes after the switch hold the Facto model (M, D) and the callback's state.
`trainer.fit(module, ckpt_path=...)` with a FactoCallback configured the same way resumes them
exactly: Lightning loads the weights the network shares, the callback compiles it again, loads the
rest, and rebuilds the optimizer before Lightning restores the optimizer's and schedulers' state.
The callback's state holds torch's random state too (Lightning's checkpoints do not), which the
codes' stochastic rounding draws from, and a resume restores it.
To use the trained network elsewhere, load the exported dense model.

One device only (Lightning's SingleDeviceStrategy): under DDP the switch would add parameters the
DDP wrapper does not know of. examples/ddp_train.py runs Facto under DDP in a plain loop.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, fx, nn
from torch.optim import Optimizer
from torch.optim import lr_scheduler as sched
from torch.utils.data import DataLoader, IterableDataset

import facto_fx
from facto_fx.config import FactoConfig
from facto_fx.methods import method_layers
from facto_fx.training.config import TrainConfig

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import SingleDeviceStrategy
    from lightning.pytorch.utilities import rank_zero_warn
    from lightning.pytorch.utilities.exceptions import MisconfigurationException
except ImportError as error:  # an optional extra: say how to get it
    raise ImportError(
        'facto_fx.integrations.lightning needs PyTorch Lightning: pip install "facto-fx[lightning]" '
        "(or pip install lightning)"
    ) from error

__all__ = ["FactoCallback"]

# Schedulers whose only per-group state is base_lrs (LambdaLR's and MultiplicativeLR's lr_lambdas too):
# the optimizer's new group for M is one more entry. OneCycleLR and CyclicLR keep rates and momenta of
# their own per group and are refused rather than guessed at.
_MOVABLE = (
    sched.StepLR, sched.MultiStepLR, sched.ConstantLR, sched.LinearLR, sched.ExponentialLR, sched.PolynomialLR,
    sched.CosineAnnealingLR, sched.CosineAnnealingWarmRestarts, sched.LambdaLR, sched.MultiplicativeLR,
    sched.ReduceLROnPlateau,
)
_COMPOSITE = (sched.SequentialLR, sched.ChainedScheduler)


def first_tensor(batch: Any) -> Tensor:
    """The network's input in a batch: the batch itself if it is a tensor, else its first element
    ((inputs, targets) pairs)."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise MisconfigurationException(
        f"FactoCallback cannot tell the network's input in a batch of type {type(batch).__name__}: pass "
        "FactoCallback(..., batch_inputs=<a function from a batch to the network's input tensor>)"
    )


class FactoCallback(pl.Callback):
    """Compile the LightningModule's network for Facto at `start_epoch`, train it low-rank with merges,
    export the dense network at the end (the module docstring has the details).

    start_epoch: the epoch (from 0) at whose start Facto begins, the learning-rate drop.
    attribute: the LightningModule's attribute holding the network ("model"; dotted for a nested one);
        it is replaced by the Facto model.
    config: a FactoConfig for `facto_fx.compile` (None: its defaults).
    lr_scale: every rate of the optimizer at the switch is multiplied by it (0.1: the drop).
    low_rank_lr: M's rate as a multiple of the rate of the group it copies (TrainConfig's 4: M restarts
        from zero at every merge).
    merge_every: optimizer steps between merges, or "epoch" for one epoch's steps.
    calibration_batches: train batches re-estimating the batch-norm statistics at the switch.
    batch_inputs: a batch (after the module's transfer hooks) to the network's input; by default the
        batch itself if it is a tensor, else its first element. Pass one if training_step transforms
        the inputs before the network sees them.
    export_path: where to save the dense model's state_dict at the end (None: not saved).

    After the switch `fmodel`, `hooks` (merges counted in `hooks.merges`) and `example_inputs` (two
    samples, the verification input) are set; after training, `dense_model`.
    """

    def __init__(
        self,
        start_epoch: int,
        *,
        attribute: str = "model",
        config: FactoConfig | None = None,
        lr_scale: float = 0.1,
        low_rank_lr: float = TrainConfig.low_rank_lr,
        merge_every: int | Literal["epoch"] = "epoch",
        calibration_batches: int = 8,
        batch_inputs: Callable[[Any], Tensor] | None = None,
        export_path: str | Path | None = None,
    ) -> None:
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"start_epoch must be an epoch number >= 0; got {start_epoch!r}")
        if not isinstance(attribute, str) or not all(attribute.split(".")):
            raise ValueError(f"attribute must name the LightningModule's attribute holding the network; got "
                             f"{attribute!r}")
        if config is not None and not isinstance(config, FactoConfig):
            raise ValueError(f"config must be a FactoConfig or None; got {type(config).__name__}")
        if config is not None and config.direction == "gradient":
            raise ValueError("config: direction='gradient' needs a probe loss (facto_fx.attach(..., probe=...)), "
                             "which FactoCallback cannot build from a LightningModule; use 'gaussian' or "
                             "'orthonormal'")
        for name, value in (("lr_scale", lr_scale), ("low_rank_lr", low_rank_lr)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0; got {value!r}")
        if merge_every != "epoch" and (isinstance(merge_every, bool) or not isinstance(merge_every, int)
                                       or merge_every < 1):
            raise ValueError(f'merge_every must be "epoch" or a number of optimizer steps >= 1; got {merge_every!r}')
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ValueError(f"calibration_batches must be an int >= 1; got {calibration_batches!r}")
        if batch_inputs is not None and not callable(batch_inputs):
            raise ValueError(f"batch_inputs must be a function from a batch to the network's input; got "
                             f"{batch_inputs!r}")
        self.start_epoch, self.attribute, self.config = start_epoch, attribute, config
        self.lr_scale, self.low_rank_lr = float(lr_scale), float(low_rank_lr)
        self.merge_every, self.calibration_batches = merge_every, calibration_batches
        self.batch_inputs = batch_inputs or first_tensor
        self.export_path = Path(export_path) if export_path is not None else None
        self.fmodel: fx.GraphModule | None = None
        self.hooks: facto_fx.FactoHooks | None = None
        self.example_inputs: Tensor | None = None
        self.dense_model: nn.Module | None = None
        self.switched_at: int | None = None
        self._w_decay = 0.0
        self._strict: bool | None = None  # the module's strict_loading while the callback loads checkpoints
        self._resume: dict | None = None  # this callback's state in the checkpoint being resumed
        self._rng: dict | None = None  # torch's random state in that checkpoint
        self._checkpoint_weights: dict[str, Tensor] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(attribute=self.attribute)  # one callback per network

    # -- Lightning's hooks ---------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.fmodel is not None:
            raise MisconfigurationException("this FactoCallback already ran a fit; give each fit a new one")
        if trainer.world_size > 1 or not isinstance(trainer.strategy, SingleDeviceStrategy):
            raise MisconfigurationException(
                f"FactoCallback runs on one device (SingleDeviceStrategy), not under {type(trainer.strategy).__name__}:"
                " the switch adds parameters a DDP wrapper would not synchronise (examples/ddp_train.py shows "
                "Facto under DDP in a plain loop)"
            )
        # A checkpoint from after the switch holds M and D, which the network has not grown yet: Lightning
        # loads what it can and the callback loads the whole state itself in on_fit_start, strictly if the
        # module asks for it.
        self._strict, pl_module.strict_loading = pl_module.strict_loading, False

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._checkpoint_weights = checkpoint["state_dict"]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = state_dict if state_dict.get("switched_at") is not None else None
        self._rng = state_dict.get("rng")  # absent from checkpoints written before it existed

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strict = pl_module.strict_loading if self._strict is None else self._strict
        pl_module.strict_loading, self._strict = strict, None
        self._check_trainer(trainer, pl_module)
        weights, self._checkpoint_weights = self._checkpoint_weights, None
        state, self._resume = self._resume, None
        if weights is None and trainer.ckpt_path is not None:  # Lightning calls no callback without their states
            raise MisconfigurationException(
                f"the checkpoint {trainer.ckpt_path} has no callback states (save_weights_only=True?), which "
                "FactoCallback needs to resume; load its weights into the module before fitting instead"
            )
        if state is not None:
            assert weights is not None
            self._resume_facto(trainer, pl_module, state, weights, strict)
        elif weights is not None:
            facto_keys = [key for key in weights if key.startswith(f"{self.attribute}.") and key.endswith(".M")]
            if facto_keys:
                raise MisconfigurationException(
                    f"the checkpoint holds a Facto model ({facto_keys[0]}, ...) but no state of a FactoCallback with "
                    f"attribute={self.attribute!r}: resume it with the callback it was written with"
                )
            pl_module.load_state_dict(weights, strict=strict)  # Lightning loaded it leniently (setup)
        rng, self._rng = self._rng, None
        if rng is not None and trainer.ckpt_path is not None:  # the codes' stochastic rounding draws from it
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fmodel is None and trainer.current_epoch >= self.start_epoch:
            self._switch(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fmodel is not None:
            self.dense_model = facto_fx.export_dense(self.fmodel)
        else:
            rank_zero_warn(f"FactoCallback: training ended before start_epoch={self.start_epoch}, so Facto never "
                           "started; the dense model is the network as it was trained")
            self.dense_model = self._network(pl_module)
        if self.export_path is not None and trainer.is_global_zero:
            self.export_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.dense_model.state_dict(), self.export_path)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._strict is not None:  # the fit failed before on_fit_start
            pl_module.strict_loading, self._strict = self._strict, None

    def state_dict(self) -> dict[str, Any]:
        rng = {"cpu": torch.get_rng_state(),  # and the one device's (SingleDeviceStrategy) where CUDA runs
               "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None}
        if self.fmodel is None:
            return {"switched_at": None, "rng": rng}
        assert self.example_inputs is not None
        return {
            "rng": rng,
            "switched_at": self.switched_at,
            "merge_every": self.hooks.merge_every if self.hooks is not None else 1,
            "w_decay": self._w_decay,
            "hooks": self.hooks.state_dict() if self.hooks is not None else None,
            "method_state": facto_fx.method_state(self.fmodel),
            "example_shape": list(self.example_inputs.shape),
            "example_dtype": str(self.example_inputs.dtype).removeprefix("torch."),
        }

    # -- the switch ---------------------------------------------------------------------------

    def _switch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compile the network on calibration batches and train the Facto model from here on."""
        inputs = self._calibration_inputs(trainer)
        example = inputs[0][:2]  # compile checks the Facto model against the network on it, at M = 0
        fmodel = facto_fx.compile(self._network(pl_module), self.config, calibration_data=inputs,
                                  example_inputs=example)
        merge_every = self.merge_every if isinstance(self.merge_every, int) else _steps_per_epoch(trainer)
        self._use(trainer, pl_module, fmodel, example, trainer.current_epoch, merge_every, w_decay=None)

    def _resume_facto(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: dict,
                      weights: dict[str, Tensor], strict: bool) -> None:
        """The switch again, on the checkpoint's statistics (no calibration), then its state loaded:
        M, D and the draws in the weights, the hooks' step count, the methods' own state."""
        dtype = getattr(torch, state["example_dtype"])
        shape, device = state["example_shape"], pl_module.device
        example = (torch.randn(shape, dtype=dtype, device=device) if dtype.is_floating_point
                   else torch.zeros(shape, dtype=dtype, device=device))
        fmodel = facto_fx.compile(self._network(pl_module), self.config, example_inputs=example)
        self._use(trainer, pl_module, fmodel, example, state["switched_at"], state["merge_every"], state["w_decay"])
        pl_module.load_state_dict(weights, strict=strict)
        facto_fx.load_method_state(fmodel, state["method_state"])
        if self.hooks is not None and state["hooks"] is not None:
            self.hooks.load_state_dict(state["hooks"])

    def _use(self, trainer: pl.Trainer, pl_module: pl.LightningModule, fmodel: fx.GraphModule, example: Tensor,
             epoch: int, merge_every: int, w_decay: float | None) -> None:
        """The Facto model in the network's place, the optimizer rebuilt for it, the schedulers moved
        over, the merge hooks attached. w_decay None: the new rate of W's group times its weight decay."""
        self._set_network(pl_module, fmodel)
        old = trainer.optimizers[0]
        optimizer, source = _facto_optimizer(old, fmodel, self.lr_scale, self.low_rank_lr)
        for config in trainer.lr_scheduler_configs:
            _move_scheduler(config.scheduler, optimizer, source, self.lr_scale, self.low_rank_lr)
        trainer.optimizers = [optimizer]
        if w_decay is None:
            group = optimizer.param_groups[source]
            w_decay = float(group["lr"]) * float(group.get("weight_decay", 0.0))
        self._w_decay = w_decay
        # apply_ratio=0 may rewrite no layer that acts after steps: nothing to attach then
        self.hooks = facto_fx.attach(fmodel, optimizer, merge_every, w_decay) if method_layers(fmodel) else None
        self.fmodel, self.example_inputs, self.switched_at = fmodel, example, epoch

    def _calibration_inputs(self, trainer: pl.Trainer) -> list[Tensor]:
        loader = trainer.train_dataloader
        if loader is None or isinstance(loader, (dict, list, tuple)):
            raise MisconfigurationException(
                "FactoCallback calibrates on the batches of a single train dataloader; got "
                f"{type(loader).__name__}"
            )
        if isinstance(loader, DataLoader) and loader.num_workers > 0 and loader.persistent_workers:
            loader = _without_workers(loader)  # iterating it would reset the epoch's own iterator
        inputs = []
        for batch in itertools.islice(loader, self.calibration_batches):
            x = self.batch_inputs(trainer.strategy.batch_to_device(batch))
            if not isinstance(x, Tensor):
                raise MisconfigurationException(f"batch_inputs must return the network's input tensor; got "
                                                f"{type(x).__name__}")
            inputs.append(x)
        if not inputs:
            raise MisconfigurationException("the train dataloader gave no batch to calibrate the network on")
        return inputs

    def _check_trainer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """What the switch needs, checked when the fit starts rather than epochs later."""
        self._network(pl_module)  # after configure_model, which may build it
        if len(trainer.optimizers) != 1:
            raise MisconfigurationException(f"FactoCallback needs exactly one optimizer; configure_optimizers "
                                            f"returned {len(trainer.optimizers)}")
        for config in trainer.lr_scheduler_configs:
            _check_movable(config.scheduler)
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and self.start_epoch >= max_epochs:
            raise MisconfigurationException(f"start_epoch={self.start_epoch} is not before max_epochs={max_epochs}: "
                                            "Facto would never start")

    def _network(self, pl_module: pl.LightningModule) -> nn.Module:
        try:
            network = pl_module.get_submodule(self.attribute)
        except AttributeError:
            network = None
        if network is None or network is pl_module:
            raise MisconfigurationException(
                f"FactoCallback(attribute={self.attribute!r}): {type(pl_module).__name__} has no submodule "
                f"'{self.attribute}'; keep the network in an attribute (self.model = ...) and name it"
            )
        return network

    def _set_network(self, pl_module: pl.LightningModule, network: nn.Module) -> None:
        parent, _, name = self.attribute.rpartition(".")
        setattr(pl_module.get_submodule(parent) if parent else pl_module, name, network)


def _facto_optimizer(old: Optimizer, fmodel: fx.GraphModule, lr_scale: float,
                     low_rank_lr: float) -> tuple[Optimizer, int]:
    """`old`'s class and groups with every rate times lr_scale and the parameters that no longer train
    (Facto's frozen W) left out, then a group for M: the hyperparameters of the group holding the
    first compressed layer's weight (returned as `source`), low_rank_lr times its rate, no weight decay.
    Groups keep their places (an emptied one stays), so schedulers' per-group lists still line up."""
    low_rank = facto_fx.low_rank_parameters(fmodel)
    low_rank_ids = {id(p) for p in low_rank}
    source = _source_group(old, fmodel)
    groups = []
    for group in old.param_groups:
        params = [p for p in group["params"] if p.requires_grad and id(p) not in low_rank_ids]
        groups.append(_scaled({**group, "params": params}, lr_scale))
    groups.append(_scaled({**old.param_groups[source], "params": low_rank, "weight_decay": 0.0},
                          lr_scale * low_rank_lr))
    try:
        return type(old)(groups, **old.defaults), source
    except TypeError as error:
        raise MisconfigurationException(
            f"FactoCallback rebuilds the optimizer as {type(old).__name__}(param_groups, **optimizer.defaults), "
            f"which failed: {error}"
        ) from error


def _source_group(optimizer: Optimizer, fmodel: fx.GraphModule) -> int:
    """The group of the first compressed layer's weight (or any parameter of it); 0 if none is there."""
    group_of = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
    for _, layer, _ in method_layers(fmodel):
        for param in layer.parameters():
            if id(param) in group_of:
                return group_of[id(param)]
    return 0


def _scaled(group: dict, factor: float) -> dict:
    for key in ("lr", "initial_lr"):  # initial_lr: a scheduler's base rate for the group
        if key in group:
            group[key] = group[key] * factor
    return group


def _check_movable(scheduler: Any) -> None:
    if isinstance(scheduler, _COMPOSITE):
        for inner in scheduler._schedulers:
            _check_movable(inner)
    elif not isinstance(scheduler, _MOVABLE):
        movable = ", ".join(cls.__name__ for cls in (*_MOVABLE, *_COMPOSITE))
        raise MisconfigurationException(
            f"FactoCallback cannot move a {type(scheduler).__name__} to the optimizer it builds at the switch (it "
            f"may keep per-group state of its own); use one of {movable}, or none and let lr_scale drop the rate"
        )


def _move_scheduler(scheduler: Any, optimizer: Optimizer, source: int, lr_scale: float, low_rank_lr: float) -> None:
    """`scheduler` onto `optimizer`, whose groups are the old ones (rates times lr_scale) and M's last
    (group `source`'s rates times low_rank_lr too): its per-group lists scaled and extended alike."""

    def extended(values: list, rates: bool = True) -> list:
        values = [value * lr_scale for value in values] if rates else list(values)
        return [*values, values[source] * low_rank_lr if rates else values[source]]

    if isinstance(scheduler, _COMPOSITE):
        for inner in scheduler._schedulers:
            _move_scheduler(inner, optimizer, source, lr_scale, low_rank_lr)
    elif isinstance(scheduler, sched.ReduceLROnPlateau):
        scheduler.min_lrs = extended(scheduler.min_lrs)
    else:
        scheduler.base_lrs = extended(scheduler.base_lrs)
        if hasattr(scheduler, "lr_lambdas"):
            scheduler.lr_lambdas = extended(scheduler.lr_lambdas, rates=False)
    scheduler.optimizer = optimizer
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _steps_per_epoch(trainer: pl.Trainer) -> int:
    """Optimizer steps in an epoch: Lightning steps every accumulate_grad_batches batches and at the last."""
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        raise MisconfigurationException('merge_every="epoch" needs a train dataloader with a length; pass '
                                        "FactoCallback(..., merge_every=<optimizer steps>)")
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))


def _without_workers(loader: DataLoader) -> DataLoader:
    """The same batches (dataset, sampler, collate) loaded in this process."""
    if isinstance(loader.dataset, IterableDataset):
        return DataLoader(loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last,
                          collate_fn=loader.collate_fn)
    if loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn)
    return DataLoader(loader.dataset, batch_size=None, sampler=loader.sampler, collate_fn=loader.collate_fn)
