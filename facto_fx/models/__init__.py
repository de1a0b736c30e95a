"""The paper's models that torchvision lacks: fixup-ResNet (ImageNet) and CIFAR-size VGG.

``MODELS`` maps a name to its constructor, for the CLI, examples and benchmarks; the CIFAR VGGs
come with and without batch-norm ("_bn", as torchvision names them).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from .cifar_vgg import (
    CIFAR_VGG_CFGS,
    CifarVGG,
    cifar_vgg11,
    cifar_vgg13,
    cifar_vgg16,
    cifar_vgg19,
)
from .fixup_resnet import (
    FixupBasicBlock,
    FixupBottleneck,
    FixupResNet,
    fixup_resnet18,
    fixup_resnet34,
    fixup_resnet50,
)

MODELS: dict[str, Callable[..., nn.Module]] = {
    "fixup_resnet18": fixup_resnet18,
    "fixup_resnet34": fixup_resnet34,
    "fixup_resnet50": fixup_resnet50,
    "cifar_vgg11": cifar_vgg11,
    "cifar_vgg13": cifar_vgg13,
    "cifar_vgg16": cifar_vgg16,
    "cifar_vgg19": cifar_vgg19,
    **{f"{name}_bn": partial(ctor, batch_norm=True) for name, ctor in
       [("cifar_vgg11", cifar_vgg11), ("cifar_vgg13", cifar_vgg13), ("cifar_vgg16", cifar_vgg16),
        ("cifar_vgg19", cifar_vgg19)]},
}

__all__ = [
    "CIFAR_VGG_CFGS",
    "MODELS",
    "CifarVGG",
    "FixupBasicBlock",
    "FixupBottleneck",
    "FixupResNet",
    "cifar_vgg11",
    "cifar_vgg13",
    "cifar_vgg16",
    "cifar_vgg19",
    "fixup_resnet18",
    "fixup_resnet34",
    "fixup_resnet50",
]
