"""Batch-norm statistics that describe the current weights, before `compile` freezes them.

Facto freezes batch-norm statistics at the switch to low-rank training (paper §3.3). Running
averages kept with momentum trail the weights: after fast early training they describe weights
that no longer exist, and a model compiled on them starts far below its own accuracy (torchvision
resnet18 on digits after one epoch: 0.281 instead of 0.911). `recalibrate_batch_norm` re-estimates
them on a few batches; `stale_statistics` says which look stale without data to re-estimate on.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


def batch_norms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """Every batch-norm layer that keeps running statistics, by qualified name."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _inputs(batch: object) -> Tensor:
    """The model input of a batch: a tensor, or the first element of an (x, y, ...) tuple or list."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(f"calibration batches must be tensors or (inputs, ...) tuples; got {type(batch).__name__}")


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, batches: Iterable | Tensor, *, device: torch.device | str | None = None,
                           progress: bool = False) -> int:
    """Re-estimate every batch-norm's running statistics on `batches` with the current weights.

    Each statistic becomes the plain average over the batches (momentum None while it runs), as
    `torch.nn.BatchNorm2d` defines it; the layers' momenta and the model's training mode are
    restored afterwards. Only the statistics change, in place: the forward passes take no gradient.
    `batches`: tensors or (inputs, targets) pairs, such as a DataLoader (a few dozen are plenty); a
    single tensor is one batch (iterating it would give single samples). progress=True shows a
    progress bar (the trainer's); a library call stays quiet by default.
    Returns the number of batches used; ValueError if there were none.
    """
    norms = [m for _, m in batch_norms(model)]
    if not norms:
        return 0
    if isinstance(batches, Tensor):
        batches = [batches]
    momenta = [m.momentum for m in norms]
    was_training = model.training
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    model.train()
    used = 0
    try:
        from tqdm.auto import tqdm

        for batch in tqdm(batches, desc="recalibrating batch-norm", unit="batch", leave=False, disable=not progress):
            x = _inputs(batch)
            model(x.to(device) if device is not None else x)
            used += 1
        if used == 0:
            raise ValueError("recalibrate_batch_norm got no batches: pass a DataLoader or a list of input batches")
    except BaseException:
        for m, (mean, var, count) in zip(norms, saved, strict=True):  # leave the model as it was
            m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(count)
        raise
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return used


def stale_statistics(model: nn.Module) -> list[str]:
    """Batch-norm layers whose statistics were never estimated (still mean 0, variance 1 in every
    channel, those of a fresh layer): freezing them freezes nothing the weights computed."""
    return [name for name, m in batch_norms(model)
            if int(m.num_batches_tracked) == 0 and bool((m.running_mean == 0).all() and (m.running_var == 1).all())]
