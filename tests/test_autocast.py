"""A Facto model under bf16 autocast: the low-rank gradients stay fp32 and close to fp32 training."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import facto_fx
from facto_fx.layers import LOW_RANK_LAYERS
from facto_fx.models import cifar_vgg11


def _grads(fmodel, x, y, autocast: bool):
    fmodel.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = F.cross_entropy(fmodel(x), y)
    loss.backward()
    return [m.M.grad for m in fmodel.modules() if isinstance(m, LOW_RANK_LAYERS)]


def _cosines(fmodel, x, y) -> list[float]:
    fp32 = _grads(fmodel, x, y, autocast=False)
    bf16 = _grads(fmodel, x, y, autocast=True)
    assert len(bf16) > 5 and all(grad.dtype == torch.float32 for grad in bf16)
    return [F.cosine_similarity(r.flatten(), g.flatten(), dim=0).item() for r, g in zip(fp32, bf16, strict=True)]


def test_bf16_autocast_gradients_match_fp32():
    """Frozen statistics (and any model in eval mode): M's bf16 gradients are fp32's to bf16 rounding."""
    torch.manual_seed(0)
    model = cifar_vgg11(num_classes=10, batch_norm=True).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for batch_norm in ("freeze", "lossy"):
        cosines = _cosines(facto_fx.compile(model, inr=0.3, apply_ratio=1.0, batch_norm=batch_norm), x, y)
        assert min(cosines) > 0.97, (batch_norm, cosines)  # bf16 rounding, accumulated over the depth


def test_bf16_autocast_with_batch_statistics_is_as_close_as_torchs_batch_norm():
    """Batch statistics of 4 samples amplify bf16's rounding in any batch-norm: the pooled x̂ of
    batch_norm='lossy' loses no more than torch's own batch-norm (batch_norm='train') does."""
    torch.manual_seed(0)
    model = cifar_vgg11(num_classes=10, batch_norm=True).train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    lossy = _cosines(facto_fx.compile(model, inr=0.3, apply_ratio=1.0, batch_norm="lossy"), x, y)
    torchs = _cosines(facto_fx.compile(model, inr=0.3, apply_ratio=1.0, batch_norm="train"), x, y)
    for ours, reference in zip(lossy, torchs, strict=True):
        assert ours > min(0.97, reference - 0.01), (lossy, torchs)
