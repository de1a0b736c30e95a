"""Checkpoints are written atomically: a failed save keeps the previous file and leaves no debris."""

from __future__ import annotations

import pytest
import torch

from facto_fx.training.checkpoint import load, save_atomic


class Unpicklable:
    def __reduce__(self):
        raise KeyboardInterrupt  # as if the run were interrupted half-way through writing


def test_round_trip(tmp_path):
    path = save_atomic({"w": torch.arange(3)}, tmp_path / "sub" / "ckpt.pt")
    assert torch.equal(load(path)["w"], torch.arange(3))


def test_an_interrupted_save_keeps_the_previous_checkpoint(tmp_path):
    path = save_atomic({"step": 1}, tmp_path / "ckpt.pt")
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"step": 2, "big": torch.zeros(1000), "bad": Unpicklable()}, path)
    assert load(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint at"):
        load(tmp_path / "nope.pt")
