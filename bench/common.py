"""What the benchmarks share: a LeNet-5 trained briefly on MNIST (or loaded from a checkpoint)."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spiralkit.export import save_weights
from spiralkit.models import lenet5, load_weights
from spiralkit.train import OptimizerConfig, TrainConfig, supervised, train


def trained_lenet5(train_loader: Iterable[tuple[Tensor, Tensor]], *, checkpoint: Path | None, quick: bool) -> nn.Module:
    """LeNet-5 from ``checkpoint`` when that file exists, else trained for two epochs (one short with ``quick``).

    A freshly trained model is saved to ``checkpoint`` when one is given.
    """
    torch.manual_seed(0)
    model = lenet5()
    if checkpoint is not None and checkpoint.is_file():
        load_weights(model, checkpoint)
        print(f"loaded LeNet-5 from {checkpoint}")
        return model.eval()
    config = TrainConfig(
        epochs=1 if quick else 2,
        optimizer=OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4),
        lr_schedule="cosine",
        max_batches=150 if quick else None,
    )
    start = time.perf_counter()
    train(model, train_loader, config=config, objective=supervised(F.cross_entropy), seed=0, progress=True,
          description="LeNet-5 on MNIST")
    print(f"trained LeNet-5 for {config.epochs} epoch(s) in {time.perf_counter() - start:.0f} s")
    if checkpoint is not None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        save_weights(model, checkpoint)
        print(f"saved the checkpoint to {checkpoint}")
    return model.eval()


def add_common_arguments(parser: argparse.ArgumentParser, *, quick_help: str) -> None:
    """The options every LeNet-5 benchmark takes: --quick, --checkpoint, --data-root, --workdir."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="LeNet-5 weights: loaded when the file exists, else written after training")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="directory holding mnist/ (default: $SPIRALKIT_DATA_DIR, else ../shared/data)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the .onnx files here (default: a temp dir)")


def default_data_root(args: argparse.Namespace) -> argparse.Namespace:
    """Point ``--data-root`` at ``../shared/data`` beside the project when nothing else says where."""
    if args.data_root is None and not os.environ.get("SPIRALKIT_DATA_DIR"):
        args.data_root = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return args


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Rows under a header as a plain-text table with aligned columns."""
    cells = [tuple(header), *(tuple(row) for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
