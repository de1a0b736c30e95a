"""CIFAR-size VGG (32x32 inputs), as in the widely used pytorch-cifar VGG.

torchvision's VGG is built for 224x224 ImageNet inputs (7x7 adaptive pool, 4096-wide classifier);
the small-image experiments and fast tests need the CIFAR variant: the same conv stacks
(configurations A/B/D/E of Simonyan & Zisserman 2014, i.e. VGG11/13/16/19), five 2x2 max-pools
that take 32x32 down to 1x1, and a 512-wide classifier.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CIFAR_VGG_CFGS", "CifarVGG", "cifar_vgg11", "cifar_vgg13", "cifar_vgg16", "cifar_vgg19"]

# fmt: off
#: Conv widths per layer; "M" is a 2x2 max-pool with stride 2 (VGG configurations A, B, D, E).
CIFAR_VGG_CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [
        64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
    ],
    "vgg19": [
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
        512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
    ],
}
# fmt: on


class CifarVGG(nn.Module):
    """VGG for 32x32 inputs: features -> flatten (512) -> Linear-ReLU-[Dropout]-Linear.

    Init: convs kaiming-normal (fan_out, relu); every conv/linear bias zero; batch-norm weight
    one; linear weights keep PyTorch's default.
    """

    def __init__(
        self,
        cfg_name: str,
        num_classes: int = 10,
        in_channels: int = 3,
        batch_norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if cfg_name not in CIFAR_VGG_CFGS:
            valid = ", ".join(sorted(CIFAR_VGG_CFGS))
            raise ValueError(f"unknown CIFAR VGG config {cfg_name!r}; valid names: {valid}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.cfg_name = cfg_name
        self.features = self._make_features(CIFAR_VGG_CFGS[cfg_name], in_channels, batch_norm)
        head: list[nn.Module] = [nn.Linear(512, 512), nn.ReLU(inplace=True)]
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(512, num_classes))
        self.classifier = nn.Sequential(*head)
        self._init_weights()

    @staticmethod
    def _make_features(cfg: list[int | str], in_channels: int, batch_norm: bool) -> nn.Sequential:
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            assert isinstance(v, int)
            layers.append(nn.Conv2d(channels, v, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            channels = v
        return nn.Sequential(*layers)

    @torch.no_grad()
    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def cifar_vgg11(**kwargs: Any) -> CifarVGG:
    """CIFAR VGG11 (configuration A); the paper's VGG11 at CIFAR size."""
    return CifarVGG("vgg11", **kwargs)


def cifar_vgg13(**kwargs: Any) -> CifarVGG:
    """CIFAR VGG13 (configuration B)."""
    return CifarVGG("vgg13", **kwargs)


def cifar_vgg16(**kwargs: Any) -> CifarVGG:
    """CIFAR VGG16 (configuration D); the paper's VGG16 at CIFAR size."""
    return CifarVGG("vgg16", **kwargs)


def cifar_vgg19(**kwargs: Any) -> CifarVGG:
    """CIFAR VGG19 (configuration E)."""
    return CifarVGG("vgg19", **kwargs)
