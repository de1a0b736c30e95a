"""HOSVD / SVD fine-tuning on real data: scikit-learn's digits, accuracy and activation memory.

    python benchmarks/hosvd_digits.py

A small CNN (6 convs, batch-norm, a linear classifier) is pretrained on the digits 0-4. Its last
two conv layers and a fresh classifier are then fine-tuned on all ten digits, everything else
frozen (the paper's setting: the last layers of a pretrained network adapted to a new task), once
with plain autograd and once with each method on those two convs (the classifier trains densely
in all runs). Reported: test accuracy after fine-tuning, and the bytes
the two conv layers keep for backward on one training batch (vanilla: their inputs; methods: the
codes, measured by facto_fx.report on real data).

Every fine-tuning run follows the same schedule to convergence (30 epochs, SGD with cosine decay
to zero): comparing runs cut short measures how fast each gets there, not where it ends (at 4
epochs vanilla is still at 0.95). Accuracies are means over three seeds; the test set holds 360
images, so one image is 0.28 points. About 20 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses

import torch
from digits_runs import accuracy, small_cnn, train
from torch import nn
from torch.utils.data import TensorDataset

import facto_fx
from facto_fx.training.data import load_digits_splits

LAYERS = ("0.14", "0.17")  # the last two convs


def fine_tune_setup(pretrained: nn.Sequential, seed: int) -> nn.Sequential:
    """A copy with a fresh classifier, only it and the last two convs trainable."""
    model = copy.deepcopy(pretrained)
    torch.manual_seed(seed)
    model[3].reset_parameters()
    trainable = {f"{name}.weight" for name in LAYERS} | {"3.weight", "3.bias"}
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return model


RUNS = {"vanilla": None, "hosvd 0.8": facto_fx.HOSVD(0.8), "hosvd 0.9": facto_fx.HOSVD(0.9),
        "svd 0.8": facto_fx.SVD(0.8), "svd 0.9": facto_fx.SVD(0.9)}


def one_seed(data, seed: int, pretrain_epochs: int, epochs: int) -> dict[str, tuple[float, int, int]]:
    """label -> (test accuracy, bytes the two convs keep, bytes of their inputs), for one seed."""
    x, y = data.train.tensors
    first_half = dataclasses.replace(data, train=TensorDataset(x[y < 5], y[y < 5]))
    torch.manual_seed(seed)
    pretrained = small_cnn()
    train(pretrained, first_half, pretrain_epochs, lr=0.05, seed=seed)
    print(f"seed {seed}: pretrained on 0-4, test accuracy on all ten {accuracy(pretrained, data):.4f}")
    batch = x[:64]
    results = {}
    for label, method in RUNS.items():
        model = fine_tune_setup(pretrained, seed)
        # Only the two convs change (vanilla: None, dense); no Facto, no masks; batch-norm frozen in
        # every run, so the runs differ only in what the two convs keep.
        fmodel = facto_fx.compile(model, apply_ratio=0.0, binarize_activations=False,
                                  methods=dict.fromkeys(LAYERS, method))
        train(fmodel, data, epochs, lr=0.02, seed=seed)
        rows = [r for r in facto_fx.report(fmodel, batch).rows if r.layer in LAYERS]
        inputs = sum(r.input_bytes for r in rows)
        kept = inputs if method is None else sum(r.facto_own_bytes for r in rows)
        results[label] = (accuracy(fmodel, data), kept, inputs)
        print(f"  {label:<10} test accuracy {results[label][0]:.4f}   the two convs keep {kept / 1024:7.1f} KiB")
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)

    data = load_digits_splits(32)
    per_seed = [one_seed(data, seed, args.pretrain_epochs, args.epochs) for seed in args.seeds]
    print(f"\nmean over seeds {args.seeds} ({len(data.test)} test images), fine-tuned {args.epochs} epochs:")
    results = {}
    for label in RUNS:
        accs = torch.tensor([seed[label][0] for seed in per_seed])
        kept = sum(seed[label][1] for seed in per_seed) / len(per_seed)
        inputs = sum(seed[label][2] for seed in per_seed) / len(per_seed)
        results[label] = {"accuracy": accs.mean().item(), "spread": (accs.max() - accs.min()).item(), "bytes": kept}
        print(f"{label:<10} test accuracy {accs.mean():.4f} (min {accs.min():.4f}, max {accs.max():.4f})"
              f"   the two convs keep {kept / 1024:8.1f} KiB ({100 * kept / inputs:.1f} % of their inputs)")
    return results


if __name__ == "__main__":
    main()
