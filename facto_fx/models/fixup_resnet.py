"""fixup-ResNet: residual networks trained without normalisation layers.

The Facto-CNN paper (Table 3) reports fixup-ResNet18/34/50 because, having no batch-norm, their
residual branches end in a learnable *scale layer* (``out * self.scale``) whose saved input is a
large share of the feature-map memory; Facto compresses it. The code follows the ImageNet model
of the official Fixup implementation (Zhang, Dauphin, Ma 2019, "Fixup Initialization: Residual
Learning Without Normalization", github.com/hongyi-zhang/Fixup), layer for layer, so that the
model's saved-feature-map size is comparable with the paper's baseline.

Everything is plain ``nn.Module`` code that ``torch.fx.symbolic_trace`` traces; the scale multiply
is written literally as ``out * self.scale`` (a tensor times a 1-element ``nn.Parameter``), the
pattern the FX matcher recognises as a scale layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "FixupBasicBlock",
    "FixupBottleneck",
    "FixupResNet",
    "fixup_resnet18",
    "fixup_resnet34",
    "fixup_resnet50",
]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _scalar(value: float) -> nn.Parameter:
    """A 1-element learnable parameter: Fixup's scalar biases and multipliers."""
    return nn.Parameter(torch.full((1,), float(value)))


def _he_std(conv: nn.Conv2d) -> float:
    """He-normal std with fan_out = out_channels * prod(kernel_size), as in the official code."""
    fan_out = conv.weight.shape[0] * math.prod(conv.weight.shape[2:])
    return math.sqrt(2.0 / fan_out)


class FixupBasicBlock(nn.Module):
    """Two 3x3 convs with scalar biases before each conv/activation and a scale at the end."""

    expansion: int = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        # Both conv1 and downsample reduce the resolution when stride != 1.
        self.bias1a = _scalar(0.0)
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bias1b = _scalar(0.0)
        self.relu = nn.ReLU(inplace=True)
        self.bias2a = _scalar(0.0)
        self.conv2 = _conv3x3(planes, planes)
        self.scale = _scalar(1.0)
        self.bias2b = _scalar(0.0)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x + self.bias1a)
        out = self.relu(out + self.bias1b)

        out = self.conv2(out + self.bias2a)
        out = out * self.scale + self.bias2b

        if self.downsample is not None:
            identity = self.downsample(x + self.bias1a)

        out = out + identity
        return self.relu(out)


class FixupBottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 convs (expansion 4) with Fixup scalar biases and a final scale."""

    expansion: int = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        # Both conv2 and downsample reduce the resolution when stride != 1.
        self.bias1a = _scalar(0.0)
        self.conv1 = _conv1x1(inplanes, planes)
        self.bias1b = _scalar(0.0)
        self.bias2a = _scalar(0.0)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bias2b = _scalar(0.0)
        self.bias3a = _scalar(0.0)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.scale = _scalar(1.0)
        self.bias3b = _scalar(0.0)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x + self.bias1a)
        out = self.relu(out + self.bias1b)

        out = self.conv2(out + self.bias2a)
        out = self.relu(out + self.bias2b)

        out = self.conv3(out + self.bias3a)
        out = out * self.scale + self.bias3b

        if self.downsample is not None:
            identity = self.downsample(x + self.bias1a)

        out = out + identity
        return self.relu(out)


class FixupResNet(nn.Module):
    """ImageNet-style ResNet without batch-norm, initialised with Fixup.

    Fixup init (official code): with L = sum(layers) residual branches of m layers each, the
    first m-1 convs of a branch get He-normal std times L ** (-1 / (2m - 2)) (m=2: L^-1/2,
    m=3: L^-1/4), the last conv of each branch and the fc layer are zero, downsample convs are
    He-normal. At init every branch therefore outputs its scalar bias (0) and the model's output
    is the fc bias (0).
    """

    def __init__(
        self,
        block: type[FixupBasicBlock] | type[FixupBottleneck],
        layers: list[int] | tuple[int, ...],
        num_classes: int = 1000,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must list the blocks of 4 stages, got {list(layers)}")
        self.num_layers = sum(layers)
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bias1 = _scalar(0.0)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.bias2 = _scalar(0.0)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self._fixup_init()

    def _make_layer(
        self,
        block: type[FixupBasicBlock] | type[FixupBottleneck],
        planes: int,
        blocks: int,
        stride: int = 1,
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = _conv1x1(self.inplanes, planes * block.expansion, stride)
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers.extend(block(self.inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    @torch.no_grad()
    def _fixup_init(self) -> None:
        for m in self.modules():
            if isinstance(m, FixupBasicBlock):
                nn.init.normal_(m.conv1.weight, 0.0, _he_std(m.conv1) * self.num_layers ** (-0.5))
                nn.init.zeros_(m.conv2.weight)
            elif isinstance(m, FixupBottleneck):
                for conv in (m.conv1, m.conv2):
                    nn.init.normal_(conv.weight, 0.0, _he_std(conv) * self.num_layers ** (-0.25))
                nn.init.zeros_(m.conv3.weight)
            else:
                continue
            if isinstance(m.downsample, nn.Conv2d):
                # == kaiming_normal_(mode="fan_out", nonlinearity="relu")
                nn.init.normal_(m.downsample.weight, 0.0, _he_std(m.downsample))
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.relu(x + self.bias1)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x + self.bias2)


def fixup_resnet18(**kwargs: Any) -> FixupResNet:
    """fixup-ResNet18 (paper Table 3): basic blocks [2, 2, 2, 2]."""
    return FixupResNet(FixupBasicBlock, [2, 2, 2, 2], **kwargs)


def fixup_resnet34(**kwargs: Any) -> FixupResNet:
    """fixup-ResNet34 (paper Table 3): basic blocks [3, 4, 6, 3]."""
    return FixupResNet(FixupBasicBlock, [3, 4, 6, 3], **kwargs)


def fixup_resnet50(**kwargs: Any) -> FixupResNet:
    """fixup-ResNet50 (paper Table 3): bottleneck blocks [3, 4, 6, 3]."""
    return FixupResNet(FixupBottleneck, [3, 4, 6, 3], **kwargs)
