"""The training loop: exact resume, dense export, full-rank -> Facto switch, and its errors."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from facto_fx.layers import FactoConv2d
from facto_fx.methods import method_parameters
from facto_fx.model_zoo import build_model
from facto_fx.training import TrainConfig, train
from facto_fx.training.checkpoint import load
from facto_fx.training.trainer import (
    CHECKPOINT,
    DENSE,
    HISTORY,
    EpochRecord,
    Trainer,
    frozen_at_full_rate,
    large_steps_at_full_rate,
    near_chance,
    run_header,
)

TINY = TrainConfig(  # three batches an epoch learn nothing: the switch is fixed, or it would wait
    model="cifar_vgg11_bn", batch_size=16, epochs=3, frt_epochs=1, limit_batches=3, merge_every=2,
    lr=0.02, progress=False, seed=1, switch="fixed",
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


def test_a_checkpoint_whose_auto_froze_statistics_is_not_resumed_on_batch_statistics(tmp_path):
    """Checkpoints of format 1 meant by "auto" frozen statistics where the rate dropped at the
    switch; "auto" now means compile's default (batch statistics), so resuming one would change
    what the run computes: refused, naming both."""
    config = dataclasses.replace(TINY, epochs=1, frt_epochs=1, out=str(tmp_path))
    train(config)
    path = tmp_path / "checkpoint.pt"
    state = load(path)
    state["format"], state["config"]["epochs"], state["config"]["batch_norm"] = 1, 3, "auto"  # dropped at 1
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"options differ from the checkpoint's \(batch_norm: 'freeze' -> 'lossy'\)"):
        train(dataclasses.replace(config, resume=True, epochs=3))
    resumed = train(dataclasses.replace(config, resume=True, epochs=3, batch_norm="freeze"))
    assert [r.phase for r in resumed.history] == ["full-rank", "facto", "facto"]


def test_a_checkpoint_from_before_the_activation_codes_resumes_only_without_them(tmp_path):
    """A checkpoint without activation_bits left activations as they were; resuming it with the
    codes would change what the run computes: refused, naming the option."""
    config = dataclasses.replace(TINY, epochs=1, frt_epochs=1, out=str(tmp_path))
    train(config)
    path = tmp_path / "checkpoint.pt"
    state = load(path)
    del state["config"]["activation_bits"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"options differ from the checkpoint's \(activation_bits: None -> 2\)"):
        train(dataclasses.replace(config, resume=True))
    train(dataclasses.replace(config, resume=True, activation_bits=None))


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint at"):
        train(dataclasses.replace(TINY, out=str(tmp_path), resume=True))


def test_frozen_statistics_at_the_full_learning_rate_are_warned_about():
    same_rate = TrainConfig(epochs=6, frt_epochs=1, lr_milestones=(), batch_norm="freeze")
    assert "no lower than full-rank training's 0.05, with 3 batch-norm layers" in frozen_at_full_rate(same_rate, 1, 3)
    assert "--batch-norm lossy" in frozen_at_full_rate(same_rate, 1, 3)
    dropped = TrainConfig(epochs=6, frt_epochs=1, batch_norm="freeze")
    assert frozen_at_full_rate(dropped, 1, 3) is None
    assert frozen_at_full_rate(dropped, 3, 3) is None  # a later switch still runs at the dropped rate
    assert frozen_at_full_rate(same_rate, 1, 0) is None  # nothing frozen
    assert frozen_at_full_rate(dataclasses.replace(same_rate, batch_norm="train"), 1, 3) is None
    assert frozen_at_full_rate(dataclasses.replace(same_rate, batch_norm="auto"), 1, 3) is None
    assert frozen_at_full_rate(TrainConfig(epochs=6, frt_epochs=6, lr_milestones=(), batch_norm="freeze"), 6, 3) is None


def test_unbiased_steps_at_the_full_learning_rate_are_warned_about():
    same_rate = TrainConfig(epochs=6, frt_epochs=1, lr_milestones=())
    message = large_steps_at_full_rate(same_rate, 1)
    assert "no lower than full-rank training's 0.05" in message and "M at 4x the rate" in message
    assert "--scale paper --low-rank-lr 1" in message
    assert large_steps_at_full_rate(TrainConfig(epochs=6, frt_epochs=1), 1) is None  # the default drop
    assert large_steps_at_full_rate(dataclasses.replace(same_rate, scale="paper"), 1) is None
    assert large_steps_at_full_rate(TrainConfig(epochs=6, frt_epochs=6, lr_milestones=()), 6) is None  # never starts


def test_near_chance_reads_the_last_full_rank_loss_against_half_of_ln_classes():
    def history(loss):
        return [EpochRecord(1, "full-rank", 2.3, 0.1, 0.1, 100.0, 0), EpochRecord(2, "full-rank", loss, 0.5, 0.5, 1, 0)]

    assert near_chance(history(1.14), 10) is None  # ln 10 / 2 = 1.151
    assert "after epoch 2 is 1.16, above half of chance (ln 10 / 2 = 1.15)" in near_chance(history(1.16), 10)
    assert near_chance(history(0.34), 2) is None and near_chance(history(0.35), 2)  # ln 2 / 2 = 0.347
    assert near_chance([], 10) == "no full-rank training yet"


@pytest.mark.parametrize("clip", [0.05, 0.0])
def test_a_step_is_sgd_on_the_gradients_clipped_to_clip_grad_norm(clip):
    """One full-rank step against torch's SGD on a copy of the model, its gradients scaled by hand
    to the norm `clip` (0: unscaled). The default 1.0 clips nearly every step of a fresh model."""
    config = dataclasses.replace(TINY, epochs=1, frt_epochs=1, limit_batches=1, clip_grad_norm=clip)
    trainer = Trainer(config)
    reference = build_model(config.model, num_classes=10)
    reference.load_state_dict(trainer.raw.state_dict())
    trainer.sampler.set_epoch(0)
    x, y = next(iter(trainer.train_loader))
    trainer.fit()

    torch.nn.functional.cross_entropy(reference(x), y).backward()
    grads = [p.grad for p in reference.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if clip:
        assert norm > 2 * clip  # the step below is a clipped one
        for g in grads:
            g.mul_(clip / norm)
    torch.optim.SGD(reference.parameters(), lr=config.lr, momentum=config.momentum,
                    weight_decay=config.weight_decay).step()
    for (name, expected), actual in zip(reference.named_parameters(), trainer.raw.parameters(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_gradients_are_clipped_by_default_only_in_models_without_batch_norm():
    assert Trainer(dataclasses.replace(TINY, model="cifar_vgg11")).clip == 1.0
    assert Trainer(TINY).clip == 0.0  # cifar_vgg11_bn
    assert Trainer(dataclasses.replace(TINY, clip_grad_norm=2.0)).clip == 2.0


def test_scalar_parameters_train_at_scalar_lr_times_the_rate_in_both_phases():
    """fixup_resnet18's scalar biases and multipliers (1-element parameters), as the Fixup paper
    trains them, before and after the learning-rate drop at the switch to Facto; Facto's M at
    low_rank_lr times the rate."""
    config = dataclasses.replace(TINY, model="fixup_resnet18", epochs=2, limit_batches=1, scalar_lr=0.2)
    trainer = Trainer(config)
    for epoch, phase in ((0, "full-rank"), (1, "facto")):
        if epoch:
            trainer.fit()
        assert trainer.position.phase == phase
        rates = {id(p): group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
        params = [p for p in trainer.raw.parameters() if p.requires_grad]
        scalars = [p for p in params if p.dim() == 1 and len(p) == 1]
        assert len(scalars) == 1 + 1 + 8 * 5  # stem and head biases, 8 blocks of 4 biases and a scale
        assert len(rates) == len(params)
        low_rank = {id(p) for p in method_parameters(trainer.raw)}
        assert bool(low_rank) == (phase == "facto")
        for p in params:
            expected = config.lr_at(epoch) * (0.2 if any(p is s for s in scalars) else 1.0)
            expected *= config.low_rank_lr if id(p) in low_rank else 1.0
            assert rates[id(p)] == pytest.approx(expected)


def test_a_fixed_switch_while_the_model_is_still_at_chance_is_warned(tmp_path):
    with pytest.warns(UserWarning, match="starts although the full-rank training loss after epoch 1.*--switch auto"):
        result = train(dataclasses.replace(TINY, lr=1e-7, epochs=2, out=str(tmp_path)))
    assert [r.phase for r in result.history] == ["full-rank", "facto"]


def test_an_auto_switch_waits_while_the_model_is_at_chance_and_says_so(tmp_path, capsys):
    config = dataclasses.replace(TINY, lr=1e-7, epochs=2, switch="auto", out=str(tmp_path))
    with pytest.warns(UserWarning, match="Facto never started.*--switch fixed"):
        result = train(config)
    assert [r.phase for r in result.history] == ["full-rank", "full-rank"]
    assert re.search(r"Facto waits: the full-rank training loss after epoch 1 is 2\.\d\d, above half of chance",
                     capsys.readouterr().out)
    exported = load(tmp_path / DENSE)  # the dense model is the full-rank one
    assert all(torch.equal(v, result.model.state_dict()[k]) for k, v in exported["state_dict"].items())


def test_a_delayed_switch_resumes_bit_identically(tmp_path, monkeypatch):
    """Facto waits one epoch past frt_epochs (the verdict is stubbed: three batches learn nothing),
    then starts; a run stopped in its Facto phase resumes to the same numbers, switch epoch and all."""
    import facto_fx.training.trainer as trainer

    monkeypatch.setattr(trainer, "near_chance", lambda history, classes: "waiting" if len(history) < 2 else None)
    config = dataclasses.replace(TINY, epochs=4, switch="auto", batch_norm="lossy")
    whole = train(dataclasses.replace(config, out=str(tmp_path / "whole")))
    assert [r.phase for r in whole.history] == ["full-rank", "full-rank", "facto", "facto"]
    assert load(tmp_path / "whole" / CHECKPOINT)["position"]["switched_at"] == 2
    cut = dataclasses.replace(config, out=str(tmp_path / "cut"), checkpoint_every=8)
    with pytest.raises(Interrupt):
        train(cut, on_step=_stop_at(9))
    assert load(tmp_path / "cut" / CHECKPOINT)["position"]["phase"] == "facto"
    resumed = train(dataclasses.replace(cut, resume=True))
    assert _numbers(resumed.history) == _numbers(whole.history)
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_the_default_learning_rate_drop_comes_where_a_delayed_switch_starts_facto(monkeypatch):
    """Facto waits one epoch past frt_epochs (the verdict stubbed); the rate each step ran at,
    read from the optimizer, drops with the switch, not at frt_epochs."""
    import facto_fx.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "near_chance", lambda history, classes: "waiting" if len(history) < 2 else None)
    config = dataclasses.replace(TINY, epochs=3, switch="auto", batch_norm="lossy")
    trainer = Trainer(config)
    rates = []
    trainer.on_step = lambda step: rates.append(trainer.optimizer.param_groups[-1]["lr"])  # not M's group
    trainer.fit()
    assert [r.phase for r in trainer.history] == ["full-rank", "full-rank", "facto"]
    assert rates == pytest.approx([config.lr] * 6 + [config.lr * config.lr_gamma] * 3)


def test_the_header_places_the_switch_against_the_papers_regime():
    early = run_header(dataclasses.replace(TINY, epochs=10, frt_epochs=1), torch.device("cpu"))
    paper = run_header(dataclasses.replace(TINY, epochs=10, frt_epochs=3), torch.device("cpu"))
    assert "after 10% of the epochs, earlier than the paper's 30 %: expect less" in early
    assert "after 30% of the epochs, as in the paper" in paper and "3 full-rank" in paper
    waiting = run_header(dataclasses.replace(TINY, epochs=10, frt_epochs=3, switch="auto"), torch.device("cpu"))
    assert "at least 3 full-rank" in waiting and "(later while full-rank training is near chance)" in waiting
    vanilla = run_header(dataclasses.replace(TINY, epochs=2, frt_epochs=2), torch.device("cpu"))
    assert "2 epochs: full-rank throughout; batch 16" in vanilla and "Facto" not in vanilla
