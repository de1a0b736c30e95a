"""FactoCallback: the switch at start_epoch, the optimizer and schedulers it rebuilds, merges, the dense
export, exact resume from Lightning checkpoints, and its errors."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")

import facto_fx  # noqa: E402
from facto_fx.integrations.lightning import FactoCallback  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval:UserWarning"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`:UserWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),  # lightning on new torch
]

LR, WEIGHT_DECAY, BATCHES = 0.05, 5e-4, 4  # 4 batches (optimizer steps) an epoch


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class Module(L.LightningModule):
    def __init__(self, scheduler=None) -> None:
        super().__init__()
        self.model = TinyNet()
        self.scheduler = scheduler
        self.compiled: list[bool] = []  # at each epoch's start (the callback's hook runs first): Facto yet?

    def on_train_epoch_start(self) -> None:
        self.compiled.append(isinstance(self.model, fx.GraphModule))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9, weight_decay=WEIGHT_DECAY)
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler(optimizer)}


def loader() -> DataLoader:
    x = torch.randn(16 * BATCHES, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16 * BATCHES) % 4
    return DataLoader(TensorDataset(x, y), batch_size=16)  # not shuffled: a resumed run sees the same batches


def trainer(tmp_path, callbacks, epochs: int = 3, **options) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(max_epochs=epochs, callbacks=callbacks, default_root_dir=tmp_path, **{**defaults, **options})


def fit(tmp_path, callback: FactoCallback, epochs: int = 3, scheduler=None, saver=None,
        **options) -> tuple[Module, L.Trainer]:
    torch.manual_seed(0)
    module = Module(scheduler)
    run = trainer(tmp_path, [callback] if saver is None else [callback, saver], epochs,
                  enable_checkpointing=saver is not None, **options)
    run.fit(module, loader())
    return module, run


def test_switches_at_start_epoch_merges_and_exports(tmp_path):
    path = tmp_path / "dense.pt"
    callback = FactoCallback(start_epoch=1, calibration_batches=2, export_path=path)
    module, run = fit(tmp_path, callback)
    assert module.compiled == [False, True, True]
    assert module.model is callback.fmodel and callback.switched_at == 1
    assert callback.hooks.merge_every == BATCHES and callback.hooks.merges == 2  # one per Facto epoch
    assert callback.hooks.w_decay == pytest.approx(0.1 * LR * WEIGHT_DECAY)

    # The optimizer Lightning steps: SGD as configured, rates x0.1, frozen W left out, M last at 4x.
    optimizer = run.optimizers[0]
    assert optimizer is callback.hooks.optimizer and isinstance(optimizer, torch.optim.SGD)
    rest, low_rank = optimizer.param_groups
    assert rest["lr"] == pytest.approx(0.1 * LR) and low_rank["lr"] == pytest.approx(0.4 * LR)
    assert rest["momentum"] == low_rank["momentum"] == 0.9
    assert rest["weight_decay"] == WEIGHT_DECAY and low_rank["weight_decay"] == 0.0
    m = facto_fx.low_rank_parameters(callback.fmodel)
    assert m and [id(p) for p in low_rank["params"]] == [id(p) for p in m]
    assert all(p.requires_grad for p in rest["params"])
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == trainable
    assert all(p.abs().sum() == 0 for p in m)  # the last step of the run merged: M restarts at zero

    # The export: the network's own class, loading strictly, computing what the Facto model computes.
    dense = TinyNet()
    dense.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(dense.eval()(x), callback.fmodel.eval()(x), rtol=1e-5, atol=1e-5)
    assert isinstance(callback.dense_model, TinyNet)


def test_merge_every_counts_optimizer_steps(tmp_path):
    callback = FactoCallback(start_epoch=1, calibration_batches=1, merge_every=3)
    fit(tmp_path, callback)
    assert callback.hooks.steps == 2 * BATCHES and callback.hooks.merges == 2 * BATCHES // 3


def test_merge_every_epoch_follows_gradient_accumulation(tmp_path):
    callback = FactoCallback(start_epoch=1, calibration_batches=1)
    fit(tmp_path, callback, epochs=2, accumulate_grad_batches=3)  # 4 batches: steps after the 3rd and the 4th
    assert callback.hooks.merge_every == 2 and callback.hooks.merges == 1


def test_calibration_leaves_the_epochs_batches_alone(tmp_path):
    """At epoch 0 Lightning has already started the epoch's iterator when the callback calibrates; with
    persistent workers a second iteration of the loader would restart it."""
    seen = []
    torch.manual_seed(0)
    module = Module()
    step = module.training_step
    module.training_step = lambda batch, batch_idx: (seen.append(float(batch[0].sum())), step(batch, batch_idx))[1]
    batches = DataLoader(loader().dataset, batch_size=16, num_workers=1, persistent_workers=True)
    callback = FactoCallback(start_epoch=0, calibration_batches=3)
    trainer(tmp_path, [callback], epochs=2).fit(module, batches)
    expected = [float(x.sum()) for x, _ in loader()]
    assert seen == 2 * expected and callback.hooks.merges == 2


def test_scheduler_moves_to_the_new_optimizer(tmp_path):
    callback = FactoCallback(start_epoch=1, calibration_batches=1, lr_scale=1.0)
    _, run = fit(tmp_path, callback, scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    scheduler = run.lr_scheduler_configs[0].scheduler
    assert scheduler.optimizer is run.optimizers[0]
    rest, low_rank = run.optimizers[0].param_groups
    # three epoch-end steps, one before the switch: the schedule goes on through it, M's group at 4x
    assert rest["lr"] == pytest.approx(LR * 0.5**3) and low_rank["lr"] == pytest.approx(4 * LR * 0.5**3)
    assert scheduler.base_lrs == pytest.approx([LR, 4 * LR])
    assert scheduler.get_last_lr() == pytest.approx([rest["lr"], low_rank["lr"]])


def test_refuses_a_scheduler_it_cannot_move_before_training(tmp_path):
    def one_cycle(optimizer):
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=3 * BATCHES)

    callback = FactoCallback(start_epoch=1)
    with pytest.raises(Exception, match="cannot move a OneCycleLR"):
        fit(tmp_path, callback, scheduler=one_cycle)
    assert callback.fmodel is None


@pytest.mark.parametrize("checkpoint_epoch", [0, 1], ids=["before-switch", "after-switch"])
def test_resume_from_a_checkpoint_is_exact(tmp_path, checkpoint_epoch):
    def step_lr(optimizer):
        return torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)

    saver = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    straight = FactoCallback(start_epoch=1, calibration_batches=2)
    module, run = fit(tmp_path, straight, scheduler=step_lr, saver=saver)

    resumed = FactoCallback(start_epoch=1, calibration_batches=2)
    torch.manual_seed(123)  # other initial weights: everything must come from the checkpoint
    again = Module(step_lr)
    rerun = trainer(tmp_path, [resumed])
    rerun.fit(again, loader(), ckpt_path=tmp_path / "ckpt" / f"epoch={checkpoint_epoch}.ckpt")
    assert resumed.switched_at == 1 and resumed.hooks.steps == straight.hooks.steps
    assert resumed.hooks.merges == straight.hooks.merges == 2
    assert resumed.hooks.w_decay == straight.hooks.w_decay
    expected, got = module.state_dict(), again.state_dict()
    assert got.keys() == expected.keys() and any(key.endswith(".D") for key in got)
    for key, value in expected.items():  # W, M, D, the draws and the batch-norm statistics
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    optimizers = run.optimizers[0].state_dict(), rerun.optimizers[0].state_dict()
    assert optimizers[0]["param_groups"] == optimizers[1]["param_groups"]  # rates through the schedule
    for index, state in optimizers[0]["state"].items():  # momentum
        torch.testing.assert_close(optimizers[1]["state"][index]["momentum_buffer"], state["momentum_buffer"])
    assert rerun.lr_scheduler_configs[0].scheduler.state_dict() == run.lr_scheduler_configs[0].scheduler.state_dict()


def test_a_checkpoint_of_a_facto_model_needs_the_callbacks_state(tmp_path):
    saver = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_weights_only=True)
    fit(tmp_path, FactoCallback(start_epoch=1, calibration_batches=1), epochs=2, saver=saver)
    path = tmp_path / "ckpt" / "epoch=1.ckpt"
    with pytest.raises(Exception, match="no callback states"):  # weights only
        trainer(tmp_path, [FactoCallback(start_epoch=1)]).fit(Module(), loader(), ckpt_path=path)
    with pytest.raises(Exception, match="Unexpected key"):  # no callback: Lightning's strict load says why
        trainer(tmp_path, []).fit(Module(), loader(), ckpt_path=path)


@pytest.mark.parametrize(("options", "argument"), [
    ({"start_epoch": -1}, "start_epoch"),
    ({"start_epoch": 1.0}, "start_epoch"),
    ({"start_epoch": 1, "lr_scale": 0}, "lr_scale"),
    ({"start_epoch": 1, "low_rank_lr": -4}, "low_rank_lr"),
    ({"start_epoch": 1, "merge_every": 0}, "merge_every"),
    ({"start_epoch": 1, "merge_every": "step"}, "merge_every"),
    ({"start_epoch": 1, "calibration_batches": 0}, "calibration_batches"),
    ({"start_epoch": 1, "attribute": ""}, "attribute"),
    ({"start_epoch": 1, "config": {"inr": 0.3}}, "config"),
    ({"start_epoch": 1, "config": facto_fx.FactoConfig(direction="gradient")}, "direction='gradient'"),
    ({"start_epoch": 1, "batch_inputs": "x"}, "batch_inputs"),
])
def test_bad_arguments_name_themselves(options, argument):
    with pytest.raises(ValueError, match=argument):
        FactoCallback(**options)


def test_errors_come_before_training(tmp_path):
    with pytest.raises(Exception, match="no submodule 'net'"):
        fit(tmp_path, FactoCallback(start_epoch=1, attribute="net"))
    with pytest.raises(Exception, match="never start"):
        fit(tmp_path, FactoCallback(start_epoch=3))
    with pytest.raises(Exception, match="cannot tell the network's input"):
        torch.manual_seed(0)
        module = Module()
        batches = [{"x": x, "y": y} for x, y in loader()]
        module.training_step = lambda batch, batch_idx: F.cross_entropy(module.model(batch["x"]), batch["y"])
        trainer(tmp_path, [FactoCallback(start_epoch=0)], epochs=1).fit(module, DataLoader(batches, batch_size=None))


def test_batch_inputs_picks_the_input(tmp_path):
    torch.manual_seed(0)
    module = Module()
    module.training_step = lambda batch, batch_idx: F.cross_entropy(module.model(batch["x"]), batch["y"])
    batches = DataLoader([{"x": x, "y": y} for x, y in loader()], batch_size=None)
    callback = FactoCallback(start_epoch=0, calibration_batches=1, batch_inputs=lambda batch: batch["x"])
    trainer(tmp_path, [callback], epochs=1).fit(module, batches)
    assert callback.hooks.merges == 1 and tuple(callback.example_inputs.shape) == (2, 3, 8, 8)


def test_importing_facto_fx_does_not_import_lightning():
    code = "import sys, facto_fx; assert not any(m.split('.')[0] == 'lightning' for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_says_how_to_install_lightning(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)  # `import lightning...` raises ImportError
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "facto_fx.integrations.lightning")
    with pytest.raises(ImportError, match=r'pip install "facto-fx\[lightning\]"'):
        importlib.import_module("facto_fx.integrations.lightning")
