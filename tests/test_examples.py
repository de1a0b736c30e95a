"""The scripts in examples/ run end to end (their --smoke mode) and do what they say."""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torchvision

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """examples/<name>.py as a module. It is imported by name from examples/ on sys.path, not from a
    spec alone, because ddp_train's spawned processes import it again by that name (spawn passes
    sys.path on)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module(name)


def test_torchvision_train(tmp_path, monkeypatch):
    example = load("torchvision_train", monkeypatch)
    result = example.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    losses = result["losses"]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0], losses
    assert result["merges"] == 1  # merge_every = one epoch, one Facto epoch
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert result["report"].facto_bytes < result["report"].vanilla_bytes
    # The export is a plain torchvision resnet18 computing what the Facto model computes.
    assert result["dense_path"].parent == tmp_path
    dense = torchvision.models.resnet18(num_classes=result["num_classes"])
    dense.load_state_dict(torch.load(result["dense_path"], weights_only=True), strict=True)
    fmodel, x = result["fmodel"].eval(), result["example"]
    with torch.no_grad():
        torch.testing.assert_close(dense.eval()(x), fmodel(x), rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")  # lightning on new torch
def test_lightning_train(tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    example = load("lightning_train", monkeypatch)
    result = example.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    losses = result["losses"]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0], losses
    assert result["merges"] == 1  # FactoCallback merges once an epoch; one Facto epoch
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert result["report"].facto_bytes < result["report"].vanilla_bytes
    # The callback's export is a plain torchvision resnet18 computing what the Facto model computes.
    assert result["dense_path"].parent == tmp_path
    dense = torchvision.models.resnet18(num_classes=result["num_classes"])
    dense.load_state_dict(torch.load(result["dense_path"], weights_only=True), strict=True)
    fmodel, x = result["fmodel"].eval(), result["example"]
    with torch.no_grad():
        torch.testing.assert_close(dense.eval()(x), fmodel(x), rtol=1e-4, atol=1e-4)


def test_lightning_train_says_how_to_install_lightning(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    for name in ("lightning", "lightning.pytorch"):
        monkeypatch.setitem(sys.modules, name, None)  # `import lightning.pytorch` raises ImportError
    for name in ("lightning_train", "facto_fx.integrations.lightning"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(SystemExit, match=r'pip install "facto-fx\[lightning\]"'):
        importlib.import_module("lightning_train")


def test_timm_finetune(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    example = load("timm_finetune", monkeypatch)
    images = example.write_random_images(tmp_path / "images")
    result = example.main(["--smoke", "--data-dir", str(images)])
    decisions = result["decisions"]
    assert result["classes"] == ["cat", "dog"]
    assert decisions[result["classifier"]] == "dense"  # by its exact name
    assert [layer for layer, label in decisions.items() if label == "hosvd"] == ["layer4.1.conv1", "layer4.1.conv2"]
    assert decisions["conv1"] == "eb"  # the input layer, which Facto never compresses, falls back to ErrorBounded
    assert "facto" in decisions.values()
    assert len(result["losses"]) == 2 and all(math.isfinite(loss) for loss in result["losses"])
    assert 0.0 <= result["val_accuracy"] <= 1.0
    assert result["report"].ratio < 0.5


def test_timm_finetune_says_how_to_install_timm(monkeypatch):
    example = load("timm_finetune", monkeypatch)
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(SystemExit, match="pip install timm"):
        example.main(["--smoke"])


def test_inspect_graph(tmp_path, monkeypatch):
    example = load("inspect_graph", monkeypatch)
    result = example.main(["--smoke", "--out", str(tmp_path)])
    dot = result["dot"]
    assert dot == tmp_path / "layer1.0.dot"
    text = dot.read_text()
    assert text.startswith("digraph")
    for node in ("layer1_0_conv1", "layer1_0_bn1", "layer1_0_relu", "layer1_0_conv2", "layer1_0_bn2"):
        assert f'"{node}"' in text, node
    assert "layer2_0" not in text  # only the selected block
    assert "FactoConv2d" in text and "facto.relu" in text
    if importlib.util.find_spec("matplotlib") is not None:
        assert result["plot"] == tmp_path / "memory_per_layer.png" and result["plot"].stat().st_size > 0
    else:
        assert result["plot"] is None
    assert result["report"].facto_bytes < result["report"].vanilla_bytes


def test_ddp_train_keeps_ranks_identical(tmp_path, monkeypatch):
    example = load("ddp_train", monkeypatch)
    result = example.main(["--smoke", "--out", str(tmp_path)])  # not under torchrun: spawns 2 CPU processes
    assert result["world_size"] == 2
    assert result["merges"] == 1
    assert all(math.isfinite(loss) for loss in result["losses"])
    first, second = (torch.load(path, weights_only=True) for path in result["rank_states"])
    assert any(key.endswith(".M") for key in first) and any(key.endswith(".D") for key in first)
    assert first.keys() == second.keys()
    for key in first:  # W, M, D and the batch-norm statistics, through a merge
        assert torch.equal(first[key], second[key]), key
    dense = torchvision.models.resnet18(num_classes=10)
    dense.load_state_dict(torch.load(result["dense_path"], weights_only=True), strict=True)
