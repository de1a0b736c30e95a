"""The facto-fx command: report, and its errors."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from facto_fx.cli import main


def test_report_prints_a_per_layer_table_with_total(capsys):
    code = main(["report", "--model", "cifar_vgg11", "--num-classes", "10", "--batch-size", "8",
                 "--image-size", "32", "--apply-ratio", "1.0"])
    out = capsys.readouterr().out
    assert code == 0
    assert "features.3" in out and "facto" in out
    ratio = float(re.search(r"\(([\d.]+) % of vanilla\)", out).group(1))
    assert 0 < ratio < 20


def test_report_with_hosvd_on_the_last_layers(capsys):
    """--method hosvd --last 2: the two deepest convs are HOSVD rows, worst case said."""
    code = main(["report", "--model", "resnet18", "--batch-size", "64", "--method", "hosvd", "--eps", "0.9",
                 "--last", "2", "--apply-ratio", "0"])
    out = capsys.readouterr().out
    assert code == 0 and "full-rank worst case" in out
    rows = [line.split() for line in out.splitlines() if line.split()[1:3] == ["conv2d", "hosvd"]]
    assert [r[0] for r in rows] == ["layer4.1.conv1", "layer4.1.conv2"]
    assert main(["report", "--model", "resnet18", "--method", "hosvd", "--eps", "1.5"]) == 2
    assert "eps must be a number in (0, 1]" in capsys.readouterr().err


def test_report_and_train_with_the_error_bounded_preset(capsys, tmp_path):
    """--method eb: Facto in front, ErrorBounded for the rest; the analytic report says its rows
    are counted uncompressed, training logs and reports what the codes kept."""
    assert main(["report", "--model", "mobilenet_v3_small", "--method", "eb", "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "ErrorBounded for the rest" in out and "counted uncompressed" in out
    decisions = {(line.split()[1], line.split()[2]) for line in out.splitlines() if len(line.split()) > 2}
    # codes for activations, the store for products and depthwise convs, ErrorBounded for the rest
    assert {("mul", "fixed"), ("conv2d", "eb"), ("activation", "fewbit")} <= decisions
    code = main(["train", "--model", "cifar_vgg11", "--method", "eb", "--epochs", "2", "--frt-epochs", "1",
                 "--switch", "fixed", "--limit-batches", "3", "--batch-size", "16",
                 "--no-progress", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0 and "error-bounded:" in out and "codes" in out and "x smaller" in out
    assert main(["train", "--method", "eb", "--eb", "0"]) == 2
    assert "eb" in capsys.readouterr().err


def test_report_with_the_store_counts_fewer_bytes_and_names_its_rows(capsys):
    """--store-bits 4 puts depthwise convs and squeeze-excite products in the store; none leaves them."""
    def report(bits: str) -> tuple[set, float]:
        assert main(["report", "--model", "mobilenet_v3_small", "--image-size", "64", "--store-bits", bits]) == 0
        lines = [line.split() for line in capsys.readouterr().out.splitlines()]
        total = next(float(line[2]) for line in lines if line and line[0] == "total")
        return {(line[1], line[2]) for line in lines if len(line) > 2}, total

    stored, stored_total = report("4")
    plain, plain_total = report("none")
    assert {("conv2d", "fixed"), ("mul", "fixed")} <= stored and not any(m == "fixed" for _, m in plain)
    assert stored_total < plain_total


def test_report_matches_the_measured_figure_at_batch_256(capsys):
    """vgg16 at batch 256, 224²: docs/design.md §5's 17,909 MiB baseline, computed without allocating."""
    assert main(["report", "--model", "vgg16", "--apply-ratio", "0.6"]) == 0
    total = capsys.readouterr().out.splitlines()[-1]
    assert total.split()[1] == "17909.000"


def test_report_peak_measures_both_models_on_a_real_batch(capsys):
    """--peak runs one forward + backward of each; the peak bounds the saved bytes from above."""
    code = main(["report", "--model", "cifar_vgg11", "--num-classes", "10", "--batch-size", "4",
                 "--image-size", "32", "--apply-ratio", "1.0", "--peak", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    saved = re.search(r"total\s+([\d.]+)\s+([\d.]+)", out)
    peak = re.search(r"peak of a forward \+ backward: vanilla ([\d.]+) MiB, facto ([\d.]+) MiB", out)
    vanilla_saved, facto_saved = map(float, saved.groups())
    vanilla_peak, facto_peak = map(float, peak.groups())
    assert vanilla_peak >= vanilla_saved and facto_peak >= facto_saved and facto_peak < vanilla_peak


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


@pytest.mark.parametrize("command", ["report", "train", "demo"])
def test_help_gives_each_default_once_and_never_as_none(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    assert "default: None" not in text
    for option, default in [("--lr-gamma", "0.1"), ("--merge-every", "an epoch"), ("--seed", "0")]:
        if option in text:
            entry = text.split(f"{option} {option[2:].upper().replace('-', '_')} ", 1)[1].split(" --", 1)[0]
            assert entry.count("default:") == 1 and f"default: {default}" in entry, entry


def test_invalid_option_names_the_argument(capsys):
    assert main(["report", "--model", "cifar_vgg11", "--inr", "1.5"]) == 2
    assert "inr must be a number in (0, 1]" in capsys.readouterr().err


def test_train_on_an_image_folder_writes_checkpoint_dense_model_and_history(tmp_path, capsys):
    from training.image_folder import make_image_folder

    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    code = main(["train", "--model", "cifar_vgg11_bn", "--dataset", "imagefolder", "--data-dir", str(data),
                 "--image-size", "32", "--epochs", "2", "--frt-epochs", "1", "--switch", "fixed", "--batch-size", "4",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("cifar_vgg11_bn on imagefolder, 2 epochs: 1 full-rank, then Facto (INR 0.3")
    assert "epoch 1 (full-rank)" in printed and "epoch 2 (facto)" in printed
    assert re.search(r"Facto on: feature maps saved for backward per batch, vanilla [\d.]+ MiB -> Facto", printed)
    written = sorted(p.name for p in out.iterdir())
    assert {"checkpoint.pt", "history.json", "model_dense.pt"} <= set(written)
    if importlib.util.find_spec("matplotlib"):  # the demo's pictures of the run
        assert {"memory_per_layer.png", "compression_per_layer.png", "training_curves.png"} <= set(written)
    code = main(["train", "--model", "cifar_vgg11_bn", "--dataset", "imagefolder", "--data-dir", str(data),
                 "--image-size", "32", "--epochs", "3", "--frt-epochs", "1", "--switch", "fixed", "--batch-size", "4",
                 "--out", str(out), "--no-progress", "--resume", "--no-plots"])
    assert code == 0 and "resumed from" in capsys.readouterr().out


def test_a_demo_whose_facto_run_never_started_says_what_to_pass(tmp_path, capsys):
    code = main(["demo", "--epochs", "2", "--limit-batches", "1", "--batch-size", "8", "--lr", "1e-7",
                 "--switch", "auto", "--out", str(tmp_path), "--no-progress", "--no-plots"])
    assert code == 2 and "never left full-rank training" in capsys.readouterr().err


def test_demo_prints_the_comparison_and_writes_both_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code = main(["demo", "--epochs", "2", "--limit-batches", "2", "--batch-size", "16", "--out", str(tmp_path),
                 "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert re.search(r"vanilla\s+0\.\d{4}\s+[\d.]+\nfacto\s+0\.\d{4}\s+[\d.]+\s+\([\d.]+ % of vanilla", printed)
    assert "features.2    relu" in printed  # the per-layer table
    for name in ("memory_per_layer.png", "training_curves.png"):
        assert (tmp_path / name).stat().st_size > 5000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "mnist"],
         "unknown dataset 'mnist'; valid names: digits, mnist5k, mnist5k_crops, cifar10, imagefolder"),
        (["--model", "resnet81"], "unknown model 'resnet81'. Did you mean"),
        (["--dataset", "imagefolder", "--data-dir", "/nonexistent"], "--data-dir /nonexistent does not exist"),
        (["--frt-epochs", "5", "--epochs", "2"], "frt_epochs (5) cannot exceed epochs (2)"),
    ],
)
def test_train_errors_name_the_bad_option(tmp_path, capsys, args, message):
    assert main(["train", "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_train_with_amp_and_compile_runs_through_the_switch_to_facto(tmp_path, capsys):
    """bf16 autocast + torch.compile (inductor): the compiled Facto model's fakes agree with its ops."""
    code = main(["train", "--model", "cifar_vgg11_bn", "--dataset", "digits", "--amp", "--compile", "--epochs", "2",
                 "--frt-epochs", "1", "--limit-batches", "2", "--batch-size", "8", "--out", str(tmp_path),
                 "--switch", "fixed", "--no-progress"])
    assert code == 0 and "epoch 2 (facto)" in capsys.readouterr().out


def test_amp_on_a_cpu_without_bf16_warns(tmp_path, capsys, monkeypatch):
    from facto_fx.training import trainer

    monkeypatch.setattr(trainer, "_fast_cpu_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no bf16 instructions"):
        main(["train", "--model", "cifar_vgg11", "--amp", "--device", "cpu", "--epochs", "1", "--frt-epochs", "1",
              "--limit-batches", "1", "--batch-size", "4", "--no-progress", "--no-plots", "--out", str(tmp_path)])


def test_train_takes_lossy_batch_norm(tmp_path):
    """--batch-norm lossy: the Facto phase trains batch-norm on batch statistics, so its running
    statistics keep moving after the switch (frozen ones would not)."""
    code = main(["train", "--model", "cifar_vgg11_bn", "--batch-norm", "lossy", "--epochs", "2", "--frt-epochs", "1",
                 "--switch", "fixed", "--limit-batches", "2", "--batch-size", "8",
                 "--no-progress", "--no-plots", "--out", str(tmp_path)])
    assert code == 0
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["config"]["batch_norm"] == "lossy"
    counts = {k: v.item() for k, v in saved["model"].items() if k.endswith("num_batches_tracked")}
    assert counts and all(count == 4 for count in counts.values())  # 2 full-rank steps, 2 Facto steps


def test_train_and_report_take_batch_norm(tmp_path, capsys):
    code = main(["train", "--model", "cifar_vgg11_bn", "--batch-norm", "train", "--epochs", "2", "--frt-epochs", "1",
                 "--switch", "fixed", "--limit-batches", "2", "--batch-size", "8",
                 "--no-progress", "--no-plots", "--out", str(tmp_path)])
    assert code == 0
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["config"]["batch_norm"] == "train"
    capsys.readouterr()
    assert main(["report", "--model", "resnet18", "--batch-size", "2", "--image-size", "32", "--batch-norm",
                 "train"]) == 0
    assert "batch_norm='train': left in training mode" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--batch-norm", "batch"])
    assert "--batch-norm: invalid choice: 'batch'" in capsys.readouterr().err
