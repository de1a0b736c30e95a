"""Run by test_distributed under torchrun: train a tiny config, save this rank's final state."""

import os
import sys
from pathlib import Path

import torch

from facto_fx.training import TrainConfig, train

if __name__ == "__main__":
    out = Path(sys.argv[1])
    config = TrainConfig(
        model="cifar_vgg11_bn", batch_size=8, epochs=2, frt_epochs=1, switch="fixed", limit_batches=3, merge_every=2,
        lr=0.02, progress=False, device="cpu", out=str(out / "run"),
    )
    result = train(config)
    rank = int(os.environ["RANK"])
    torch.save({"state": result.model.state_dict(), "merges": result.history[-1].merges}, out / f"rank{rank}.pt")
