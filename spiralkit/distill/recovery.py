"""Recovery after a pruning step: distil from the frozen teacher, or fine-tune on labels."""

from __future__ import annotations

from functools import singledispatch
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from spiralkit.distill.losses import kd_loss
from spiralkit.tasks import Classification
from spiralkit.train import Objective, TrainConfig, supervised, train


class Distill(BaseModel):
    """Recover by logit distillation from the unpruned model (Hinton et al. 2015).

    Attributes:
        alpha: weight of the distillation term against cross-entropy on labels.
        temperature: softening temperature ``T``.
        train: epochs, optimizer and schedule of the recovery.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["distill"] = "distill"
    alpha: float = Field(default=0.9, ge=0, le=1)
    temperature: float = Field(default=4.0, gt=0)
    train: TrainConfig = TrainConfig()


class Finetune(BaseModel):
    """Recover by fine-tuning on the labels alone."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["finetune"] = "finetune"
    train: TrainConfig = TrainConfig()


Recovery = Annotated[Distill | Finetune, Field(discriminator="kind")]


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode with gradients off: a teacher that never changes."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


@singledispatch
def recovery_objective(recovery: object, *, task: Classification, teacher: nn.Module) -> Objective:
    """The training objective of a recovery config (dispatched on its type)."""
    raise TypeError(f"unknown recovery {type(recovery).__name__}")


@recovery_objective.register
def _(recovery: Finetune, *, task: Classification, teacher: nn.Module) -> Objective:
    return supervised(task.loss)


@recovery_objective.register
def _(recovery: Distill, *, task: Classification, teacher: nn.Module) -> Objective:
    def objective(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_logits = teacher(x)
        return kd_loss(model(x), teacher_logits, y, alpha=recovery.alpha, temperature=recovery.temperature)

    return objective


def distill(
    student: nn.Module,
    teacher: nn.Module,
    loader: object,
    *,
    config: Distill | Finetune,
    task: Classification,
    seed: int = 0,
    masks: dict[str, torch.Tensor] | None = None,
    progress: bool = False,
) -> nn.Module:
    """Train ``student`` in place from the frozen ``teacher`` (or on labels alone, for `Finetune`).

    The verb behind the spiral's recovery step, usable alone: ``masks`` keeps pruned weights
    at zero while the student learns.

    Returns:
        The student, in eval mode.
    """
    objective = recovery_objective(config, task=task, teacher=freeze(teacher))
    train(student, loader, config=config.train, objective=objective, seed=seed,  # type: ignore[arg-type]
          masks=masks, progress=progress, description="distill")
    return student
