"""The training loop: exact resume, dense export, full-rank -> Facto switch, and its errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from facto_fx.layers import FactoConv2d
from facto_fx.model_zoo import build_model
from facto_fx.training import TrainConfig, train
from facto_fx.training.checkpoint import load
from facto_fx.training.trainer import (
    CHECKPOINT,
    DENSE,
    HISTORY,
    EpochRecord,
    early_switch,
    frozen_at_full_rate,
    run_header,
)

TINY = TrainConfig(
    model="cifar_vgg11_bn", batch_size=16, epochs=3, frt_epochs=1, limit_batches=3, merge_every=2,
    lr=0.02, progress=False, seed=1,
)


def _numbers(history):
    return [{k: v for k, v in dataclasses.asdict(r).items() if k != "images_per_s"} for r in history]


class Interrupt(Exception):
    pass


def _stop_at(step):
    def on_step(global_step):
        if global_step == step:
            raise Interrupt

    return on_step


def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path):
    """Stopped mid-epoch in the Facto phase, after a merge and a redraw of D, then resumed."""
    whole = train(dataclasses.replace(TINY, out=str(tmp_path / "whole")))
    config = dataclasses.replace(TINY, out=str(tmp_path / "cut"), checkpoint_every=5)
    with pytest.raises(Interrupt):
        train(config, on_step=_stop_at(6))
    saved = load(tmp_path / "cut" / CHECKPOINT)
    assert saved["position"]["global_step"] == 5 and saved["position"]["phase"] == "facto"
    assert saved["hooks"]["merges"] == 1  # the checkpoint lies after a merge and a redraw of D
    resumed = train(dataclasses.replace(config, resume=True))

    assert _numbers(resumed.history) == _numbers(whole.history)
    expected, actual = whole.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    layer = next(m for m in resumed.model.modules() if isinstance(m, FactoConv2d))
    assert int(layer.draws) == 3  # merges after steps 2, 4 and 6 (the facto phase's)


def test_outputs_dense_export_loads_into_the_original_architecture(tmp_path):
    result = train(dataclasses.replace(TINY, epochs=2, out=str(tmp_path)))
    assert [r.phase for r in result.history] == ["full-rank", "facto"]
    assert (tmp_path / HISTORY).is_file()
    exported = load(tmp_path / DENSE)
    model = build_model(exported["model"], num_classes=exported["num_classes"])
    model.load_state_dict(exported["state_dict"], strict=True)
    model.eval()
    result.model.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), result.model(x), rtol=1e-4, atol=1e-5)
    assert 0 < result.report.ratio < 0.5


def test_an_existing_checkpoint_needs_resume_and_matching_options(tmp_path):
    config = dataclasses.replace(TINY, epochs=1, frt_epochs=1, out=str(tmp_path))
    train(config)
    with pytest.raises(ValueError, match="exists; pass --resume"):
        train(config)
    with pytest.raises(ValueError, match=r"options differ from the checkpoint's \(inr: 0.3 -> 0.2\)"):
        train(dataclasses.replace(config, resume=True, inr=0.2))
    longer = train(dataclasses.replace(config, resume=True, epochs=2))  # more epochs is allowed
    assert [r.epoch for r in longer.history] == [1, 2]


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint at"):
        train(dataclasses.replace(TINY, out=str(tmp_path), resume=True))


def test_frozen_statistics_at_the_full_learning_rate_are_warned_about():
    same_rate = TrainConfig(epochs=6, frt_epochs=1, lr_milestones=(), batch_norm="freeze")
    assert "no lower than full-rank training's 0.05, with 3 batch-norm layers" in frozen_at_full_rate(same_rate, 3)
    assert "--batch-norm lossy" in frozen_at_full_rate(same_rate, 3)
    assert frozen_at_full_rate(TrainConfig(epochs=6, frt_epochs=1, batch_norm="freeze"), 3) is None  # dropped
    assert frozen_at_full_rate(same_rate, 0) is None  # nothing frozen
    assert frozen_at_full_rate(dataclasses.replace(same_rate, batch_norm="train"), 3) is None
    assert frozen_at_full_rate(dataclasses.replace(same_rate, batch_norm="auto"), 3) is None
    assert frozen_at_full_rate(TrainConfig(epochs=6, frt_epochs=6, lr_milestones=(), batch_norm="freeze"), 3) is None



def test_early_switch_reads_the_last_full_rank_loss():
    trained = [EpochRecord(1, "full-rank", 0.5, 0.9, 0.9, 100.0, 0)]
    at_chance = [EpochRecord(1, "full-rank", 2.29, 0.1, 0.1, 100.0, 0)]
    assert early_switch(trained, 10) is None
    assert "loss ln 10 = 2.30" in early_switch(at_chance, 10)
    assert "before any full-rank training" in early_switch([], 10)


def test_a_switch_while_the_model_is_still_at_chance_is_warned(tmp_path):
    with pytest.warns(UserWarning, match="still at chance.*--frt-epochs"):
        train(dataclasses.replace(TINY, lr=1e-7, epochs=2, out=str(tmp_path)))


def test_the_header_places_the_switch_against_the_papers_regime():
    early = run_header(dataclasses.replace(TINY, epochs=10, frt_epochs=1), torch.device("cpu"))
    paper = run_header(dataclasses.replace(TINY, epochs=10, frt_epochs=3), torch.device("cpu"))
    assert "after 10% of the epochs, earlier than the paper's 30 %: expect less" in early
    assert "after 30% of the epochs, as in the paper" in paper
    assert "Facto starts" not in run_header(dataclasses.replace(TINY, epochs=2, frt_epochs=2), torch.device("cpu"))
