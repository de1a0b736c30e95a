"""The facto-fx command: report, and its errors."""

from __future__ import annotations

import re

import pytest

from facto_fx.cli import main


def test_report_prints_a_per_layer_table_with_total(capsys):
    code = main(["report", "--model", "cifar_vgg11", "--num-classes", "10", "--batch-size", "8",
                 "--image-size", "32", "--apply-ratio", "1.0"])
    out = capsys.readouterr().out
    assert code == 0
    assert "features.3" in out and "facto" in out
    ratio = float(re.search(r"\(([\d.]+) % of vanilla\)", out).group(1))
    assert 0 < ratio < 20


def test_report_matches_the_measured_figure_at_batch_256(capsys):
    """vgg16 at batch 256, 224²: design.md §5's 17,909 MiB baseline, computed without allocating."""
    assert main(["report", "--model", "vgg16", "--apply-ratio", "0.6"]) == 0
    total = capsys.readouterr().out.splitlines()[-1]
    assert total.split()[1] == "17909.000"


def test_report_plot_is_written(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "breakdown.png"
    main(["report", "--model", "cifar_vgg11", "--num-classes", "10", "--batch-size", "2", "--image-size", "32",
          "--plot", str(path)])
    assert path.stat().st_size > 1000
    assert str(path) in capsys.readouterr().out


def test_unknown_model_lists_the_valid_names(capsys):
    assert main(["report", "--model", "vgg17"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'vgg17'" in err and "Did you mean" in err and "fixup_resnet18" in err


def test_invalid_option_names_the_argument(capsys):
    assert main(["report", "--model", "cifar_vgg11", "--inr", "1.5"]) == 2
    assert "inr must be a number in (0, 1]" in capsys.readouterr().err
