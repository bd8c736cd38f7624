"""Recovery after a pruning step: distil from the frozen teacher, or fine-tune on labels.

Each recovery kind is one config class whose `objective` method builds its training
objective; `RECOVERIES` lists them for the recipe. `distill` is the verb, usable alone.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from spiralkit.configs import KindTable, by_kind
from spiralkit.distill.cache import TeacherCache
from spiralkit.distill.terms import DistillObjective, LogitsTerm, LossTerm, TemperatureSchedule
from spiralkit.modules import freeze
from spiralkit.parallel import SINGLE, World
from spiralkit.tasks import Classification, EmbeddingFidelity
from spiralkit.train import EpochCheckpoint, Objective, TrainConfig, supervised, train

Task = Classification | EmbeddingFidelity


class _RoundTraining:
    """The training of a recovery in each spiral round, from its ``train`` and ``last_epochs``.

    ``last_epochs`` is the epochs of the recovery in a round that reaches its stage's target
    (default: ``train.epochs``). Iterative pruning spends most of its budget on models it
    prunes further; giving the final architecture a longer recovery is what one-shot pruning
    does with all of its epochs.
    """

    train: TrainConfig
    last_epochs: int | None

    def round_train(self, *, last: bool) -> TrainConfig:
        """The recovery's training in a round; ``last``: the round reaches its stage's target."""
        if last and self.last_epochs is not None:
            return self.train.model_copy(update={"epochs": self.last_epochs})
        return self.train


class Distill(_RoundTraining, BaseModel):
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
        last_epochs: epochs of the recovery in the round reaching a stage's target (see `_RoundTraining`).
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
    last_epochs: int | None = Field(default=None, ge=0)

    def shared_cache(self) -> TeacherCache | None:
        """A teacher cache for many recoveries from the same teacher on the same examples, if asked for."""
        return TeacherCache(budget_mb=self.cache_budget_mb) if self.cache_teacher else None

    def objective(self, *, task: Task, teacher: nn.Module, cache: TeacherCache | None = None) -> DistillObjective:
        """The distillation objective from the frozen ``teacher``.

        Args:
            task: not used: the label term of every loss is cross-entropy (the signature is shared with `Finetune`).
            teacher: the frozen teacher.
            cache: a `TeacherCache` to reuse across calls (e.g. the rounds of a spiral, whose
                teacher stays the same); ``None`` gives a distillation with ``cache_teacher``
                a cache of its own, reused across its epochs.
        """
        own = cache is None and self.cache_teacher
        if own:
            cache = TeacherCache(budget_mb=self.cache_budget_mb)
        return DistillObjective(
            teacher, self.losses, alpha=self.alpha,
            temperature=self.temperature_schedule or self.temperature,
            cache=cache if self.cache_teacher else None, owns_cache=own,
        )


class Finetune(_RoundTraining, BaseModel):
    """Recover by fine-tuning on the labels alone (``train``, ``last_epochs``: see `Distill`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["finetune"] = "finetune"
    train: TrainConfig = TrainConfig()
    last_epochs: int | None = Field(default=None, ge=0)

    def shared_cache(self) -> TeacherCache | None:
        """None: fine-tuning never runs the teacher."""
        return None

    def objective(self, *, task: Task, teacher: nn.Module, cache: TeacherCache | None = None) -> Objective:
        """The task's supervised loss; the teacher is not run."""
        return supervised(task.loss)


RECOVERIES: dict[str, type[BaseModel]] = by_kind(Distill, Finetune)
"""The recovery kinds a recipe can name: a new kind is a class with `objective` and a line here."""

Recovery = Annotated[Distill | Finetune, KindTable(RECOVERIES, what="recovery")]
"""A recipe field holding one of the `RECOVERIES`, chosen by its ``kind``."""


def fitted_to(recovery: Recovery, loader: object) -> Recovery:
    """``recovery`` with its teacher cache off when ``loader`` augments its batches.

    The cache keys each output by its input's bytes, so an augmented batch is never served
    another input's output; but every augmented batch is new, so a cache would only fill
    memory with rows it never reuses.
    """
    if getattr(loader, "augmented", False) and getattr(recovery, "cache_teacher", False):
        return recovery.model_copy(update={"cache_teacher": False})
    return recovery


def distill(
    student: nn.Module,
    teacher: nn.Module,
    loader: object,
    *,
    config: Distill | Finetune,
    task: Task,
    seed: int = 0,
    masks: dict[str, torch.Tensor] | None = None,
    progress: bool = False,
    world: World = SINGLE,
    checkpoint: EpochCheckpoint | None = None,
) -> nn.Module:
    """Train ``student`` in place from the frozen ``teacher`` (or on labels alone, for `Finetune`).

    The verb behind the spiral's recovery step, usable alone: ``masks`` keeps pruned weights
    at zero while the student learns. ``world`` and ``checkpoint``: see `spiralkit.train.train`
    (each rank keeps a teacher cache of its own, for its share of the data).

    Returns:
        The student, in eval mode.
    """
    objective = config.objective(task=task, teacher=freeze(teacher))
    try:
        train(student, loader, config=config.train, objective=objective, seed=seed,  # type: ignore[arg-type]
              masks=masks, progress=progress, description="distill", world=world, checkpoint=checkpoint)
    finally:
        if isinstance(objective, DistillObjective):
            objective.close()
    return student
