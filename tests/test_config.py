"""FactoConfig validation: every bad knob fails early, naming the argument and what it accepts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import facto_fx
from facto_fx import FactoConfig


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))


@pytest.mark.parametrize("value", [0, -1, 1.5, math.nan, "a"])
def test_bad_inr_names_argument_and_range(value):
    """inr is a ratio of channels: the message must say which knob and its interval."""
    with pytest.raises(ValueError, match=r"inr .*\(0, 1\]"):
        FactoConfig(inr=value)
    with pytest.raises(ValueError, match=r"inr .*\(0, 1\]"):
        facto_fx.compile(_tiny(), inr=value)


@pytest.mark.parametrize("value", [0, 1.5, True])
def test_bad_lossy_kernel_names_argument_and_range(value):
    """A bool is an int in Python; it must still be rejected as a pooling size."""
    with pytest.raises(ValueError, match=r"lossy_kernel .*integer >= 1"):
        FactoConfig(lossy_kernel=value)


@pytest.mark.parametrize("value", [-0.1, 1.1])
def test_bad_apply_ratio_names_argument_and_range(value):
    with pytest.raises(ValueError, match=r"apply_ratio .*\[0, 1\]"):
        FactoConfig(apply_ratio=value)


@pytest.mark.parametrize(("inr", "apply_ratio"), [(1, 0), (1.0, 1.0), (0.01, 0.5)])
def test_valid_edges_accepted(inr, apply_ratio):
    """inr=1 and apply_ratio 0 / 1 are the documented closed ends of the ranges."""
    config = FactoConfig(inr=inr, apply_ratio=apply_ratio)
    assert (config.inr, config.apply_ratio) == (inr, apply_ratio)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("bf16", torch.bfloat16), ("BF16", torch.bfloat16), (torch.float16, torch.float16), (None, None)],
)
def test_storage_dtype_accepted(value, expected):
    assert FactoConfig(storage_dtype=value).storage_dtype == expected


@pytest.mark.parametrize("value", ["int8", torch.int8, 16])
def test_storage_dtype_rejected(value):
    """Integer storage would silently quantise the compressed maps; it is refused."""
    with pytest.raises(ValueError, match="storage_dtype"):
        FactoConfig(storage_dtype=value)


def test_include_exclude_overlap():
    with pytest.raises(ValueError, match=r"both include and exclude"):
        FactoConfig(include=("a", "b"), exclude=("b",))


def test_include_must_be_a_sequence_of_names():
    """A bare string would be iterated character by character; refuse it."""
    with pytest.raises(ValueError, match="include"):
        FactoConfig(include="features.3")


def test_unknown_option_rejected():
    with pytest.raises(TypeError):
        facto_fx.compile(_tiny(), inrr=0.3)


def test_config_and_kwargs_together_rejected():
    with pytest.raises(ValueError, match="not both"):
        facto_fx.compile(_tiny(), FactoConfig(), inr=0.3)


def test_config_object_is_used():
    """A FactoConfig passed positionally reaches the rewriter (rank = round(inr · C_I))."""
    fmodel = facto_fx.compile(_tiny(), FactoConfig(inr=0.5, apply_ratio=1.0))
    assert fmodel.get_submodule("2").M.shape == (4, 2)


@pytest.mark.parametrize("value", ["cuda", "Triton", None, 1])
def test_bad_kernels_names_argument_and_choices(value):
    with pytest.raises(ValueError, match=r"kernels must be one of \('auto', 'triton', 'torch'\)"):
        FactoConfig(kernels=value)
    with pytest.raises(ValueError, match=r"kernels must be one of"):
        facto_fx.compile(_tiny(), kernels=value)


@pytest.mark.parametrize("value", ["auto", "triton", "torch"])
def test_kernels_choices_accepted(value):
    assert FactoConfig(kernels=value).kernels == value


def test_facto_defaults_agree_everywhere_they_are_offered():
    """FactoLowRank's fields are the defaults of FactoConfig, of TrainConfig and of the CLI's
    `train` and `report` flags (each is written once and read by the others)."""
    from facto_fx.cli import build_parser
    from facto_fx.training import TrainConfig

    low_rank, config, train = facto_fx.FactoLowRank(), FactoConfig(), TrainConfig()
    for name in ("inr", "lossy_kernel", "direction", "scale"):
        assert getattr(config, name) == getattr(low_rank, name) == getattr(train, name), name
    assert train.apply_ratio == config.apply_ratio
    for command in (["train"], ["report"]):
        args = build_parser().parse_args(command)
        assert (args.inr, args.lossy_kernel, args.apply_ratio) == (config.inr, config.lossy_kernel, config.apply_ratio)
