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


def test_bf16_autocast_gradients_match_fp32():
    torch.manual_seed(0)
    model = cifar_vgg11(num_classes=10, batch_norm=True).eval()
    fmodel = facto_fx.compile(model, inr=0.3, apply_ratio=1.0)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    fp32 = _grads(fmodel, x, y, autocast=False)
    bf16 = _grads(fmodel, x, y, autocast=True)
    assert len(bf16) > 5
    for reference, grad in zip(fp32, bf16, strict=True):
        assert grad.dtype == torch.float32
        cosine = F.cosine_similarity(reference.flatten(), grad.flatten(), dim=0)
        assert cosine > 0.97, cosine  # bf16 rounding, accumulated over the depth
