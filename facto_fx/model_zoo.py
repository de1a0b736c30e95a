"""Build a model by name: torchvision's classification models or the package's own."""

from __future__ import annotations

import difflib

import torch
import torchvision
from torch import nn

from facto_fx.models import MODELS


def model_names() -> list[str]:
    """Every name `build_model` accepts."""
    return sorted(MODELS) + torchvision.models.list_models(module=torchvision.models)


def check_model_name(name: str) -> None:
    """Raise a ValueError listing the close and the valid names if `build_model` does not know `name`."""
    if name in MODELS or name in torchvision.models.list_models(module=torchvision.models):
        return
    close = difflib.get_close_matches(name, model_names(), n=3)
    hint = f" Did you mean {close}?" if close else ""
    raise ValueError(f"unknown model '{name}'.{hint} Valid names: {', '.join(model_names())}")


def build_model(name: str, num_classes: int = 1000, device: torch.device | str = "cpu") -> nn.Module:
    """An untrained model; an unknown name raises ValueError listing the close and valid names."""
    check_model_name(name)
    with torch.device(device):
        if name in MODELS:
            return MODELS[name](num_classes=num_classes)
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
