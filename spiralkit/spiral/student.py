"""The student stage: build a smaller student from the trained baseline and distil it, once per run.

The student's layout is planned from the teacher the first time and saved as
``student.json``; its distilled weights as ``student.safetensors``. A resumed run reads both.
"""

from __future__ import annotations

import copy

from pydantic import BaseModel, ConfigDict
from torch import nn

from spiralkit.export import atomic_write_text, load_state, save_weights
from spiralkit.prune.students import StudentLayout, StudentSpec, apply_student, plan_student, read_layout
from spiralkit.spiral.context import RunContext, diverged, measure_model
from spiralkit.spiral.recovery import Distill, Recovery, distill, fitted_to
from spiralkit.spiral.rundir import STUDENT_LAYOUT, STUDENT_WEIGHTS, RunState, clear_epoch_checkpoint, epoch_checkpoint
from spiralkit.spiral.rundir import save_run_state
from spiralkit.train import NonFiniteLoss

__all__ = ["StudentStage", "run_student"]


class StudentStage(BaseModel):
    """Distil a student built from the trained baseline before any pruning round.

    Attributes:
        architecture: how the student is built from the teacher: ``{kind: shallow, every: 2}``
            keeps every 2nd layer of each layer stack with its weights (DistilBERT-style),
            ``{kind: narrow, ratio: 0.5}`` removes channels/heads by structured pruning.
        distill: the student's distillation (losses, epochs); fine-tuning also works.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    architecture: StudentSpec
    distill: Recovery = Distill()


def _layout(stage: StudentStage, ctx: RunContext) -> StudentLayout:
    """The student's layout: planned from the teacher once, then read from ``student.json``."""
    path = ctx.run_dir / STUDENT_LAYOUT
    if path.exists():
        return read_layout(path)
    layout = plan_student(stage.architecture, ctx.teacher, example=ctx.example,
                          batches=ctx.data.train, loss_fn=ctx.recipe.task.loss)
    layout = ctx.world.broadcast(layout)  # every rank builds rank 0's student
    if ctx.world.main:
        atomic_write_text(path, layout.model_dump_json(indent=2))
    return layout


def run_student(stage: StudentStage, model: nn.Module, state: RunState, ctx: RunContext) -> nn.Module:
    """Build the student from the baseline ``model`` and distil it (once; a resumed run loads it).

    Records the student's metrics in ``state`` and saves the state.
    """
    student = apply_student(copy.deepcopy(model), _layout(stage, ctx))
    ctx.recipe.check_model(student, ctx.example)
    weights = ctx.run_dir / STUDENT_WEIGHTS
    if state.student is not None:
        student.load_state_dict(load_state(weights))
        return student.eval()
    ctx.console.print(f"[bold]student[/]: {stage.architecture.kind}, distilling for {stage.distill.train.epochs} epoch(s)")
    try:
        distill(student, ctx.teacher, ctx.data.train, config=fitted_to(stage.distill, ctx.data.train), task=ctx.recipe.task,
                seed=ctx.recipe.seed + 500, progress=True, world=ctx.world,
                checkpoint=epoch_checkpoint(ctx.run_dir, "student"))
    except NonFiniteLoss as exc:
        raise diverged("student distillation", exc, ctx.data.train, key="student.distill.train.optimizer.lr") from None
    state.student = measure_model(student, ctx)
    if ctx.world.main:
        save_weights(student, weights)
        save_run_state(ctx.run_dir, state)
        clear_epoch_checkpoint(ctx.run_dir)
    ctx.console.print(f"student: {ctx.recipe.task.metric_name} {state.student.metric:.2f}, "
                      f"{state.student.latency_ms:.3f} ms at batch {ctx.recipe.measure.batch_size}")
    return student.eval()
