"""Look at what facto_fx.compile did to a model: the rewritten graph, the memory table, a DOT file and a plot.

What it shows:

- `facto_fx.inspect(fmodel, x)`: every node of the rewritten graph with its decision, reason, output
  shape and the bytes it saves for backward (vanilla -> Facto); `.select("layer1.0")` keeps one block;
- `facto_fx.report(fmodel, x)`: the per-layer table of saved bytes, and every layer left as it is and why;
- `view.select(...).to_dot()`: Graphviz text for the block (`dot -Tsvg layer1.0.dot > layer1.0.svg`);
- `facto_fx.plots.plot_layer_memory(report, path)`: the per-layer bar chart (needs matplotlib:
  pip install "facto-fx[plots]"; skipped with a message without it).

    python examples/inspect_graph.py                          # resnet18, 64x64, writes to ./facto-inspect
    python examples/inspect_graph.py --model vgg11 --layer features.3 --out vgg
    python examples/inspect_graph.py --smoke                  # the same into a temporary folder
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torchvision

import facto_fx
from facto_fx.plots import plot_layer_memory  # matplotlib is imported only when a plot is drawn


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="any torchvision classification model")
    parser.add_argument("--layer", default="layer1.0", help="the sub-module to show node by node")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="folder for the .dot file and the plot")
    parser.add_argument("--smoke", action="store_true", help="write into a temporary folder: checks the script runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Compile, inspect, report, write the block's DOT file and the plot; returns what it wrote and found."""
    args = parse_args(argv)
    out = args.out or (Path(tempfile.mkdtemp(prefix="facto-inspect-")) if args.smoke else Path("facto-inspect"))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    fmodel = facto_fx.compile(model, example_inputs=x)

    view = facto_fx.inspect(fmodel, x)  # decisions, reasons, shapes and saved bytes, node by node
    block = view.select(args.layer)  # the block's nodes, what lies between them, and their inputs
    print(block)
    report = facto_fx.report(fmodel, x)
    print(report)

    dot = out / f"{args.layer}.dot"
    dot.write_text(block.to_dot())
    print(f"\nDOT: {dot} (render it: dot -Tsvg {dot} -o {dot.with_suffix('.svg')})")
    try:
        plot: Path | None = plot_layer_memory(report, out / "memory_per_layer.png", title=f"{args.model}, "
                                              f"batch {args.batch_size}, {args.image_size}x{args.image_size}")
        print(f"plot: {plot}")
    except RuntimeError as missing:  # matplotlib is an optional extra; the message says how to install it
        plot = None
        print(f"plot skipped: {missing}")
    return {"dot": dot, "plot": plot, "report": report, "block": block, "view": view}


if __name__ == "__main__":
    main()
