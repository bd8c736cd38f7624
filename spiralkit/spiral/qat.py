"""Quantization-aware training as a recovery: prepare, train by logit distillation, then convert.

`spiralkit.quant.qat` prepares a model (fake-quantized layers) and converts it (`freeze_qat`,
`export_qat_onnx`); it does not train. This module is the training in between, the way the
spiral recovers a quantized model: `qat` prepares the float model on the first training
batches, then trains it with `spiralkit.train.train` on a distillation (or fine-tuning)
objective from `spiralkit.distill.recovery`. `QATRecovery` is its recipe config: the
quantization settings of `QATConfig` plus the recovery's (same YAML keys as before the split).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from typing import Protocol

from pydantic import Field
from torch import Tensor, nn

from spiralkit.data import DataSplits
from spiralkit.modules import freeze
from spiralkit.parallel import SINGLE, World
from spiralkit.spiral.recovery import Distill, Finetune
from spiralkit.quant.qat import QATConfig, prepare_qat
from spiralkit.tasks import Classification
from spiralkit.train import EpochCheckpoint, TrainConfig, train

__all__ = ["QATRecovery", "qat"]


class QATRecovery(QATConfig):
    """Quantization-aware training of Conv2d and Linear layers, with its recovery.

    Attributes:
        calibration_batches: Training batches `qat` calibrates activation ranges on.
        alpha: Weight of the distillation term (0: plain fine-tuning on labels).
        temperature: Distillation temperature ``T``.
        train: Epochs, optimizer and schedule of the recovery.

    The quantization settings (``bits``, ``activation_bits``, ``per_channel``,
    ``learn_scales``, ``quantize_activations``, ``keep_float``) are `QATConfig`'s.
    """

    calibration_batches: int = Field(default=8, gt=0)
    alpha: float = Field(default=0.9, ge=0, le=1)
    temperature: float = Field(default=4.0, gt=0)
    train: TrainConfig = TrainConfig()


class _Loader(Protocol):
    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...
    def __len__(self) -> int: ...


def qat(
    model: nn.Module,
    config: QATRecovery,
    data: DataSplits | _Loader,
    *,
    task: Classification,
    teacher: nn.Module | None = None,
    seed: int = 0,
    progress: bool = False,
    world: World = SINGLE,
    checkpoint: EpochCheckpoint | None = None,
) -> nn.Module:
    """Quantization-aware training: `prepare_qat`, then recovery by logit distillation.

    The student is trained on ``α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1−α)·CE(z_s, y)``
    (`spiralkit.distill.kd_loss`; Hinton et al. 2015) with ``z_t`` from the frozen teacher;
    with ``alpha = 0`` it is plain fine-tuning on the labels and the teacher is not run.
    Convert the result with `spiralkit.quant.qat.export_qat_onnx`.

    Args:
        model: The trained float model (not modified).
        config: Quantization and training settings.
        data: `DataSplits` (its ``train`` loader is used) or a loader of ``(x, y)`` batches.
            Activation ranges are calibrated on its first ``config.calibration_batches``.
        task: The task (its loss is the label term).
        teacher: The model to distil from; frozen in place (eval mode, no gradients).
            Default: a frozen copy of ``model``.
        seed: Seed of the training run.
        progress: Show a progress bar.
        world: The data-parallel processes training together (see `spiralkit.train.train`);
            activation ranges are calibrated on the whole first batches on every rank alike.
        checkpoint: Save the training after every epoch there, and continue from it.

    Returns:
        The trained fake-quantized model, in eval mode.

    Raises:
        QuantError: As `prepare_qat`.
        spiralkit.train.NonFiniteLoss: The loss became NaN or infinite.
    """
    loader = data.train if isinstance(data, DataSplits) else data
    student = prepare_qat(model, config, calibration_batches=itertools.islice(loader, config.calibration_batches))
    if config.alpha > 0:
        recovery: Distill | Finetune = Distill(alpha=config.alpha, temperature=config.temperature, train=config.train)
        teacher = freeze(copy.deepcopy(model) if teacher is None else teacher)
    else:
        recovery = Finetune(train=config.train)
        teacher = model  # not run by a fine-tuning objective
    objective = recovery.objective(task=task, teacher=teacher)
    train(student, loader, config=config.train, objective=objective, seed=seed, progress=progress,
          description=f"QAT {config.bits}-bit", world=world, checkpoint=checkpoint)
    return student
