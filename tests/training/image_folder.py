"""A tiny ImageFolder tree for the data and CLI tests."""

import torch
from PIL import Image


def make_image_folder(root, classes=("cat", "dog"), per_class=3, size=20):
    """A tiny ImageFolder tree: root/{train,val}/<class>/<i>.png."""
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = (torch.rand(size, size, 3, generator=g) * 120 + 100 * c).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root
