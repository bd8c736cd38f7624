"""What the benchmarks share: a LeNet-5 trained briefly on MNIST (or loaded from a checkpoint)."""

from __future__ import annotations

import time
from collections.abc import Iterable
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
