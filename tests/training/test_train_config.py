"""TrainConfig validation and the learning-rate schedule."""

from __future__ import annotations

import pytest

from facto_fx import FactoConfig
from facto_fx.training import TrainConfig


@pytest.mark.parametrize(
    "options, match",
    [
        ({"dataset": "mnist"}, "valid names: digits, mnist5k, mnist5k_crops, cifar10, imagefolder"),
        ({"optimizer": "lion"}, "valid names: sgd, adamw"),
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"frt_epochs": 4, "epochs": 3}, r"frt_epochs \(4\) cannot exceed epochs \(3\)"),
        ({"merge_every": 0}, "merge_every must be an integer >= 1"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"scalar_lr": 0.0}, r"scalar_lr must be in \(0, 1\]"),
        ({"clip_grad_norm": -1.0}, r"clip_grad_norm must be >= 0 \(0 turns clipping off\)"),
        ({"lr_milestones": (0,)}, r"lr_milestones must be epochs in \(0, 10\)"),
        ({"resume": True}, "resume needs out"),
        ({"inr": 1.5}, r"inr must be a number in \(0, 1\]"),
    ],
)
def test_bad_options_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**options)


def test_learning_rate_drops_where_facto_starts_by_default():
    config = TrainConfig(lr=0.1, epochs=4, frt_epochs=2)
    assert [round(config.lr_at(e), 6) for e in range(4)] == [0.1, 0.1, 0.01, 0.01]
    assert TrainConfig(lr=0.1, epochs=2, frt_epochs=2).lr_at(1) == 0.1  # vanilla: no switch, no drop
    assert TrainConfig(epochs=2, frt_epochs=0).milestones == ()  # Facto from the start: nothing to drop at
    custom = TrainConfig(lr=1.0, epochs=5, lr_milestones=(1, 3), lr_gamma=0.5)
    assert [custom.lr_at(e) for e in range(5)] == [1.0, 0.5, 0.5, 0.25, 0.25]


def test_a_delayed_switch_delays_the_default_drop_but_not_explicit_milestones():
    config = TrainConfig(lr=0.1, epochs=6, frt_epochs=2)
    assert [round(config.lr_at(e, switched_at=4), 6) for e in range(6)] == [0.1] * 4 + [0.01] * 2
    assert [config.lr_at(e, switched_at=6) for e in range(6)] == [0.1] * 6  # Facto never started
    explicit = TrainConfig(lr=0.1, epochs=6, frt_epochs=2, lr_milestones=(2,))
    assert [round(explicit.lr_at(e, switched_at=4), 6) for e in range(6)] == [0.1] * 2 + [0.01] * 4


def test_resume_conflicts_name_the_changed_options():
    saved = {**TrainConfig().__dict__, "inr": 0.2, "epochs": 9}
    assert TrainConfig().conflicts_with(saved) == ["inr"]


def test_resume_compares_auto_batch_norm_as_the_mode_it_means():
    """A checkpoint that froze statistics is refused under "auto" (compile's default, batch
    statistics): that run would compute otherwise; one that trained on batch statistics resumes."""
    config = TrainConfig(epochs=6, frt_epochs=1)
    assert config.conflicts_with({**config.__dict__, "batch_norm": "freeze"}) == ["batch_norm"]
    assert config.conflicts_with({**config.__dict__, "batch_norm": "lossy"}) == []
    assert config.conflicts_with({**config.__dict__, "batch_norm": "train"}) == ["batch_norm"]


def test_auto_batch_norm_before_it_meant_compiles_default_froze_only_where_the_rate_dropped():
    """What checkpoints of format 1 meant by "auto", which the trainer compares a resumption with."""
    assert TrainConfig(epochs=6, frt_epochs=1).batch_norm_before_lossy_default() == "freeze"
    assert TrainConfig(epochs=6, frt_epochs=1, lr_milestones=()).batch_norm_before_lossy_default() == "lossy"
    assert TrainConfig(epochs=6, frt_epochs=0).batch_norm_before_lossy_default() == "lossy"


def test_auto_batch_norm_is_compiles_default_whatever_the_schedule():
    for schedule in ({}, {"lr_milestones": ()}, {"lr_milestones": (3,)}, {"frt_epochs": 0}):
        config = TrainConfig(**{"epochs": 6, "frt_epochs": 1, **schedule})
        assert config.facto_config().batch_norm == FactoConfig().batch_norm == "lossy"
    for explicit in ("freeze", "lossy", "train"):
        config = TrainConfig(epochs=6, frt_epochs=1, lr_milestones=(), batch_norm=explicit)
        assert config.facto_config().batch_norm == explicit
