"""ErrorBounded on real activations: scikit-learn's digits, conv-input compression and accuracy.

    python benchmarks/eb_digits.py

COMET's setting: a CNN (6 convs with batch-norm and ReLU, two max-pools, a linear classifier) is
trained a few epochs first, then training continues twice from that state, on the same seed, data
order and schedule: once plain, once with every conv layer's saved input held error-bounded
(ErrorBounded, COMET's adaptive bound by default, re-measured every `--every` steps). Everything
else (batch-norm with batch statistics, ReLU, pools, the classifier) is plain PyTorch in both runs,
so they differ only in the error of the conv weight gradients.

Reported: final test accuracy of both runs (mean over seeds; 360 test images, one image is 0.28
points), and the conv inputs' compression ratio (their dense bytes over the codes' bytes, on a
training batch of the final model, measured by facto_fx.report).
"""

from __future__ import annotations

import argparse
import copy

import torch
from digits_runs import accuracy, mean_over, small_cnn, train
from torch import nn

import facto_fx
from facto_fx.training.data import load_digits_splits


def is_conv(_name: str, module: nn.Module | None) -> bool:
    return isinstance(module, nn.Conv2d)


def one_seed(data, seed: int, method: facto_fx.ErrorBounded, pretrain: int, epochs: int) -> dict[str, float]:
    torch.manual_seed(seed)
    model = small_cnn()
    train(model, data, pretrain, lr=0.05, seed=seed)
    plain = copy.deepcopy(model)
    # Only the convs change: no Facto (apply_ratio 0), no masks, batch-norm left in training mode.
    compressed = facto_fx.compile(copy.deepcopy(model), apply_ratio=0.0, binarize_activations=False,
                                  batch_norm="train", methods={is_conv: method})
    for run in (plain, compressed):
        torch.manual_seed(seed + 1)
        train(run, data, epochs, lr=0.02, seed=seed + 1)
    compressed.train()
    batch = data.train.tensors[0][:64]
    compressed(batch)  # a training call: an adaptive bound compresses with its latest measurement
    rows = [r for r in facto_fx.report(compressed, batch).rows if r.decision == "eb"]
    ratio = sum(r.input_bytes for r in rows) / sum(r.facto_own_bytes for r in rows)
    result = {"plain": accuracy(plain, data), "compressed": accuracy(compressed, data), "ratio": ratio}
    print(f"seed {seed}: plain {result['plain']:.4f}, compressed {result['compressed']:.4f}, "
          f"conv inputs {ratio:.1f}x smaller")
    return result


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sigma", type=float, default=0.1, help="adaptive bound: tolerated gradient error")
    parser.add_argument("--every", type=int, default=20, help="adaptive bound: steps between measurements")
    parser.add_argument("--eb", type=float, default=None, help="a fixed relative bound instead of the adaptive one")
    args = parser.parse_args(argv)

    method = (facto_fx.ErrorBounded(args.eb, relative=True) if args.eb is not None
              else facto_fx.ErrorBounded(adaptive=True, sigma=args.sigma, every=args.every))
    data = load_digits_splits(32)
    runs = [one_seed(data, seed, method, args.pretrain_epochs, args.epochs) for seed in args.seeds]
    mean = mean_over(runs)
    print(f"\n{method}, mean over seeds {args.seeds} ({len(data.test)} test images):")
    print(f"test accuracy plain {mean['plain']:.4f}, compressed {mean['compressed']:.4f} "
          f"({100 * (mean['compressed'] - mean['plain']):+.2f} points); conv inputs {mean['ratio']:.1f}x smaller")
    return mean


if __name__ == "__main__":
    main()
