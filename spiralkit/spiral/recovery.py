"""Recovery after a pruning step: distil from the frozen teacher, or fine-tune on labels."""

from __future__ import annotations

from functools import singledispatch
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from spiralkit.distill.cache import TeacherCache
from spiralkit.distill.terms import DistillObjective, LogitsTerm, LossTerm, TemperatureSchedule
from spiralkit.tasks import Classification, EmbeddingFidelity
from spiralkit.train import Objective, TrainConfig, supervised, train


class Distill(BaseModel):
    """Recover by distillation from the unpruned model.

    By default the loss is Hinton et al.'s (2015) logit distillation with cross-entropy on
    the labels; ``losses`` lists other terms (hints, attention, contrastive, layer maps) and
    their weights (see `spiralkit.distill.terms`).

    Attributes:
        alpha: weight of the distillation term against cross-entropy on labels (for
            ``logits`` terms that do not set their own).
        temperature: softening temperature ``T`` (likewise).
        temperature_schedule: anneal ``T`` over the recovery; when set, ``temperature`` is unused.
        losses: the weighted terms of the loss; default one ``logits`` term.
        cache_teacher: compute the teacher's outputs once per example and reuse them across
            epochs (inputs must not be augmented).
        cache_budget_mb: RAM for cached teacher outputs; beyond it they spill to disk.
        train: epochs, optimizer and schedule of the recovery.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["distill"] = "distill"
    alpha: float = Field(default=0.9, ge=0, le=1)
    temperature: float = Field(default=4.0, gt=0)
    temperature_schedule: TemperatureSchedule | None = None
    losses: tuple[LossTerm, ...] = Field(default=(LogitsTerm(),), min_length=1)
    cache_teacher: bool = True
    cache_budget_mb: float = Field(default=512.0, ge=0)
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
def recovery_objective(
    recovery: object, *, task: Classification | EmbeddingFidelity, teacher: nn.Module, cache: TeacherCache | None = None
) -> Objective:
    """The training objective of a recovery config (dispatched on its type).

    Args:
        recovery: `Distill` or `Finetune`.
        task: its loss is the fine-tuning objective.
        teacher: the frozen teacher of a distillation.
        cache: a `TeacherCache` to reuse across calls (e.g. the rounds of a spiral, whose
            teacher stays the same); ``None`` gives a distillation with ``cache_teacher`` a
            cache of its own, reused across its epochs.
    """
    raise TypeError(f"unknown recovery {type(recovery).__name__}")


@recovery_objective.register
def _(recovery: Finetune, *, task: Classification | EmbeddingFidelity, teacher: nn.Module, cache: TeacherCache | None = None) -> Objective:
    return supervised(task.loss)


@recovery_objective.register
def _(recovery: Distill, *, task: Classification | EmbeddingFidelity, teacher: nn.Module,
      cache: TeacherCache | None = None) -> DistillObjective:
    own = cache is None and recovery.cache_teacher
    if own:
        cache = TeacherCache(budget_mb=recovery.cache_budget_mb)
    return DistillObjective(
        teacher, recovery.losses, alpha=recovery.alpha,
        temperature=recovery.temperature_schedule or recovery.temperature,
        cache=cache if recovery.cache_teacher else None, owns_cache=own,
    )


def distill(
    student: nn.Module,
    teacher: nn.Module,
    loader: object,
    *,
    config: Distill | Finetune,
    task: Classification | EmbeddingFidelity,
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
    try:
        train(student, loader, config=config.train, objective=objective, seed=seed,  # type: ignore[arg-type]
              masks=masks, progress=progress, description="distill")
    finally:
        if isinstance(objective, DistillObjective):
            objective.close()
    return student
