"""Training on real data: the loop, data sets, checkpoints and multi-process set-up of `facto-fx train`."""

from facto_fx.training.config import TrainConfig
from facto_fx.training.trainer import EpochRecord, Trainer, TrainResult, train

__all__ = ["EpochRecord", "TrainConfig", "TrainResult", "Trainer", "train"]
