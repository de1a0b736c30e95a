"""facto_fx.inspect: the rewritten graph as text, networkx, DOT and SVG."""

from __future__ import annotations

import shutil

import pytest
import torch
import torchvision

import facto_fx
from facto_fx import inspection


@pytest.fixture(scope="module")
def resnet18_view():
    torch.manual_seed(0)
    fmodel = facto_fx.compile(torchvision.models.resnet18(num_classes=10), apply_ratio=1.0)
    x = torch.randn(2, 3, 32, 32)
    return fmodel, x, facto_fx.inspect(fmodel, x)


def test_listing_marks_facto_nodes_with_reasons(resnet18_view):
    _, _, view = resnet18_view
    text = str(view)
    assert "* layer1_0_conv1" in text and "FactoConv2d" in text
    assert "input layer: never compressed" in text  # conv1's reason
    assert "  add " in text  # a plain node, unmarked


def test_bytes_and_shapes_agree_with_report(resnet18_view):
    fmodel, x, view = resnet18_view
    table = facto_fx.report(fmodel, x)
    by_name = {n.name: n for n in view.nodes}
    assert sum(n.facto_bytes for n in view.nodes) == table.facto_bytes
    assert sum(n.vanilla_bytes for n in view.nodes) == table.vanilla_bytes
    assert by_name["layer1_0_conv1"].shape == (2, 64, 8, 8)


def test_networkx_export_carries_decisions(resnet18_view):
    graph = resnet18_view[2].to_networkx()
    assert graph.nodes["layer1_0_conv1"]["facto"] is True
    assert graph.nodes["conv1"]["facto"] is False
    assert graph.has_edge("layer1_0_bn2", "add")


def test_select_keeps_a_block_and_its_inputs(resnet18_view):
    block = resnet18_view[2].select("layer1.0")
    names = [n.name for n in block.nodes]
    assert names[0] == "relu"  # the block's input
    assert {"layer1_0_conv1", "add", "layer1_0_relu_1"} <= set(names)
    assert not any(name.startswith("layer1_1") for name in names)
    with pytest.raises(ValueError, match="no node belongs to 'layer9'"):
        resnet18_view[2].select("layer9")


def test_dot_fills_facto_nodes(resnet18_view):
    dot = resnet18_view[2].select("layer1.0").to_dot()
    assert dot.startswith("digraph") and '"layer1_0_bn2" -> "add"' in dot
    assert '"layer1_0_conv1" [label="layer1_0_conv1\\nFactoConv2d' in dot


def test_svg_without_graphviz_says_what_to_install(resnet18_view, monkeypatch):
    monkeypatch.setattr(inspection.shutil, "which", lambda _: None)
    with pytest.raises(RuntimeError, match="install graphviz"):
        resnet18_view[2].to_svg()


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed")
def test_svg_renders(resnet18_view):
    assert "<svg" in resnet18_view[2].select("layer1.0").to_svg()


def test_a_wrong_input_names_the_layer_before_anything_runs(resnet18_view, capfd):
    fmodel, _, _ = resnet18_view
    capfd.readouterr()
    with pytest.raises(ValueError, match=r"layer 'conv1' \(Conv2d\) expects 3 input channels; got input of shape"):
        facto_fx.inspect(fmodel, torch.randn(2, 4, 32, 32))
    assert capfd.readouterr().err == ""  # no ShapeProp traceback first
