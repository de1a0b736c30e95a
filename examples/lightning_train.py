"""Train a torchvision model with PyTorch Lightning: full-rank first, then Facto at the learning-rate drop.

The run of torchvision_train.py, with Lightning's Trainer in place of the hand-written loop and
`facto_fx.integrations.lightning.FactoCallback` doing the switch:

- the LightningModule is a plain one: the network in `self.model`, an SGD from configure_optimizers,
  images in channels_last (on_after_batch_transfer), bf16-mixed precision unless --no-amp;
- `FactoCallback(start_epoch=--frt-epochs)`: at that epoch it compiles `self.model` on a few training
  batches (re-estimating its batch-norm statistics), replaces the optimizer Lightning built by the same
  SGD at a tenth of the rate with the `M` matrices in a group of their own (4x the rate, no weight
  decay), and attaches `facto_fx.attach`'s hooks to merge `W <- W + M·D` once per epoch;
- when training ends, the callback exports the dense model (`facto_fx.export_dense`: a plain torchvision
  model with merged weights, saved as a state_dict); then the test accuracy and the memory saved
  (`facto_fx.report`).

Run it (resnet18 on the bundled digits, 32x32, 10 classes; needs scikit-learn and lightning:
`pip install "facto-fx[demo,lightning]"`):

    python examples/lightning_train.py              # a few minutes on a CPU; checkpoints in ./facto-lightning
    python examples/lightning_train.py --smoke      # tiny sizes, end to end in seconds
    python examples/lightning_train.py --resume facto-lightning/checkpoints/last.ckpt   # go on from a checkpoint
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision_train import WEIGHT_DECAY, cpu_threads, make_loaders  # the plain loop's data and settings

import facto_fx

try:
    import lightning.pytorch as L

    from facto_fx.integrations.lightning import FactoCallback
except ImportError as error:  # not a dependency of facto_fx itself
    raise SystemExit(f'{error}\nthis example needs PyTorch Lightning: pip install "facto-fx[lightning]"') from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="any torchvision classification model")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--frt-epochs", type=int, default=3, help="full-rank epochs before Facto (~30 %% of the run)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05, help="full-rank rate; Facto starts at a tenth of it")
    parser.add_argument("--calibration-batches", type=int, default=8, help="batches re-estimating batch-norm stats")
    parser.add_argument("--no-amp", action="store_true",
                        help="fp32 instead of bf16-mixed (CPUs without bf16 instructions emulate it, slowly)")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (--smoke: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the dense model and checkpoints (default ./facto-lightning)")
    parser.add_argument("--resume", type=Path, default=None, help="a checkpoint of this script's to go on from")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds: checks the script runs")
    args = parser.parse_args(argv)
    if args.smoke:  # torchvision_train's smoke run: 3 epochs of 6 small batches, the last one Facto
        args.epochs, args.frt_epochs, args.batch_size, args.calibration_batches = 3, 2, 32, 2
        args.threads = args.threads or 1
    if not 0 < args.frt_epochs < args.epochs:
        parser.error("--frt-epochs must be at least 1 and less than --epochs (Facto starts from a trained model)")
    return args


class Classifier(L.LightningModule):
    """A plain LightningModule: nothing here knows about Facto. The network is `self.model`, the
    attribute FactoCallback replaces by the Facto model at the switch."""

    def __init__(self, model: nn.Module, lr: float) -> None:
        super().__init__()
        self.model, self.lr = model, lr
        self.epoch_losses: list[float] = []
        self._loss_sum, self._seen = 0.0, 0

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch  # channels_last images, to match the weights (FactoCallback's calibration batches too)
        return x.contiguous(memory_format=torch.channels_last), y

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        self._loss_sum, self._seen = self._loss_sum + loss.item() * len(y), self._seen + len(y)
        return loss

    def on_train_epoch_end(self) -> None:
        self.epoch_losses.append(self._loss_sum / self._seen)
        self._loss_sum, self._seen = 0.0, 0

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        accuracy = (self.model(x).argmax(1) == y).float().mean()
        self.log("test_accuracy", accuracy, batch_size=len(y))  # averaged over the batches by their sizes

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # The full-rank optimizer; FactoCallback rebuilds it at the switch (same class and settings).
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=WEIGHT_DECAY)


def accelerator(device: str) -> dict:
    """--device as the Trainer's accelerator and devices."""
    if device == "auto":
        return {"accelerator": "auto", "devices": 1}
    kind, _, index = device.partition(":")
    if kind == "cuda":
        return {"accelerator": "gpu", "devices": [int(index)] if index else 1}
    return {"accelerator": kind, "devices": 1}


def main(argv: list[str] | None = None) -> dict:
    """Train, switch to Facto, export, test; returns the losses, accuracy, paths and models."""
    args = parse_args(argv)
    with cpu_threads(args.threads), warnings.catch_warnings():
        # Lightning suggests worker processes; the digits fit in memory and a batch is a slice of it
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        return run(args)


def run(args: argparse.Namespace) -> dict:
    """The run itself, apart from main() so that the thread count and warning filters are restored
    however it ends."""
    L.seed_everything(args.seed, verbose=False)
    train_loader, test_loader, num_classes = make_loaders(args)
    network = torchvision.models.get_model(args.model, num_classes=num_classes)
    module = Classifier(network.to(memory_format=torch.channels_last), args.lr)

    out = args.out or (Path(tempfile.mkdtemp(prefix="facto-example-")) if args.smoke else Path("facto-lightning"))
    dense_path = out / f"{args.model}_dense.pt"
    # The learning-rate drop is the switch: the callback's lr_scale=0.1 drops the rate as it rebuilds the
    # optimizer, and merges every epoch's worth of steps.
    facto = FactoCallback(start_epoch=args.frt_epochs, calibration_batches=args.calibration_batches,
                          export_path=dense_path)
    callbacks: list[L.Callback] = [facto]
    if not args.smoke:  # a checkpoint every epoch (last.ckpt): --resume goes on from it, Facto state included
        callbacks.append(L.callbacks.ModelCheckpoint(dirpath=out / "checkpoints", save_last=True))
    trainer = L.Trainer(
        max_epochs=args.epochs, **accelerator(args.device), precision="32-true" if args.no_amp else "bf16-mixed",
        callbacks=callbacks, default_root_dir=out, logger=not args.smoke, enable_checkpointing=not args.smoke,
        enable_progress_bar=not args.smoke, enable_model_summary=not args.smoke,
        log_every_n_steps=min(50, len(train_loader)),
    )
    trainer.fit(module, train_loader, ckpt_path=args.resume)
    first = trainer.current_epoch - len(module.epoch_losses)  # resumed: the epochs this run trained
    for epoch, loss in enumerate(module.epoch_losses, start=first):
        print(f"epoch {epoch + 1} {'facto' if epoch >= facto.switched_at else 'full-rank'}: loss {loss:.4f}")
    print(f"{facto.hooks.merges} merges; dense model: {dense_path} "
          f"(torchvision.models.{args.model}(num_classes={num_classes}).load_state_dict)")

    accuracy = trainer.test(module, test_loader, verbose=False)[0]["test_accuracy"]
    print(f"test accuracy {accuracy:.3f}")
    device = trainer.strategy.root_device  # Lightning leaves the module on the CPU after fit and test
    module.to(device)
    x = next(iter(train_loader))[0].to(device, memory_format=torch.channels_last)
    report = facto_fx.report(facto.fmodel, x)  # print(report) gives the table, layer by layer
    print(f"saved for backward on a batch of {len(x)}: vanilla {report.vanilla_bytes / 2**20:.2f} MiB "
          f"-> Facto {report.facto_bytes / 2**20:.2f} MiB ({100 * report.ratio:.1f} %)")
    return {"losses": module.epoch_losses, "test_accuracy": accuracy, "dense_path": dense_path,
            "num_classes": num_classes, "merges": facto.hooks.merges, "report": report, "fmodel": facto.fmodel,
            "dense_model": facto.dense_model, "example": facto.example_inputs}


if __name__ == "__main__":
    main()
