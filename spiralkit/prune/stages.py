"""Pruning stages of the spiral: how far a stage has come, and how one round cuts.

A recipe's ``prune`` section is one stage or a list of them, run in order: e.g. structured
rounds that physically remove channels until the MACs target is met, then unstructured
rounds on what remains (a *hybrid* recipe). Every stage has a target on its own progress
measure and a schedule over it:

=================  ===========================================  ===============================
stage              progress (0 → target)                         one round
=================  ===========================================  ===============================
`UnstructuredPrune`  sparsity of the selected weights               masks to the next sparsity
`StructuredStage`    ``1 − size/size(baseline)``, size = MACs,      removes channels/heads, with
                     parameters or measured latency                 the ratio searched to hit it
=================  ===========================================  ===============================

The three verbs (`stage_target`, `stage_progress`, `prune_round`) act by the stage config's
type, so the runner's loop is the same for both.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from torch import Tensor, nn

from spiralkit.configs import default_kind
from spiralkit.prune.apply import apply_plan
from spiralkit.prune.config import UnstructuredPrune, prune_to
from spiralkit.prune.importance import LossFn, Magnitude
from spiralkit.prune.plan import PrunePlan
from spiralkit.prune.schedules import AGP, Schedule
from spiralkit.prune.structured import Planner, StructuredPrune, planner
from spiralkit.prune.structured_importance import ChannelCriterion
from spiralkit.prune.unstructured import Masks, Scope, mask_sparsity

__all__ = [
    "PruneStage",
    "RoundCut",
    "StageContext",
    "StructuredStage",
    "prune_round",
    "stage_progress",
    "stage_target",
]

SizeMeasure = Literal["macs", "params", "latency"]


class StructuredStage(BaseModel):
    """Structured spiral rounds: remove channels and heads until a MACs, parameter or latency target.

    Each round searches the channel ratio whose removal brings the model to the next point
    of the schedule (e.g. 30% → 50% → 65% → 70% fewer MACs than the baseline) and removes
    those channels physically; recovery then distils from the unpruned model.

    Attributes:
        measure: what the target is on — ``macs``, ``params`` or ``latency`` (measured as
            the recipe's ``measure`` section says).
        target_reduction: the fraction of the baseline's measure to remove, e.g. 0.7 for a
            model with 30% of the baseline's MACs.
        schedule: how the rounds approach the target (on the reduction).
        criterion: importance of a channel or head (see `StructuredPrune`).
        scope: ``layerwise`` (the same ratio in every group) or ``global``.
        include: name patterns of the layers whose outputs may be removed.
        exclude: name patterns of layers kept whole.
        round_to: kept channel counts are rounded to a multiple of this.
        heads: prune attention heads whole.
        max_ratio: at most this fraction of the remaining channels goes in one round.
        bn_penalty: network slimming's L1 penalty on batch-norm scales, added to the
            recovery loss of every structured round (0: none; Liu et al. 2017).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["structured"] = "structured"
    measure: SizeMeasure = "macs"
    target_reduction: float = Field(gt=0, lt=1)
    schedule: Schedule = AGP(rounds=4)
    criterion: ChannelCriterion = Magnitude(norm=2)
    scope: Scope = Scope.LAYERWISE
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    round_to: int = Field(default=1, ge=1)
    heads: bool = True
    max_ratio: float = Field(default=0.9, gt=0, lt=1)
    bn_penalty: float = Field(default=0.0, ge=0)

    def step(self, ratio: float = 0.0) -> StructuredPrune:
        """The one-shot structured pruning config of a round with this channel ratio."""
        return StructuredPrune(
            criterion=self.criterion, ratio=ratio, scope=self.scope, include=self.include, exclude=self.exclude,
            round_to=self.round_to, heads=self.heads,
        )


PruneStage = Annotated[
    UnstructuredPrune | StructuredStage, Field(discriminator="kind"), BeforeValidator(default_kind("unstructured"))
]
"""One pruning stage of a recipe; a mapping without ``kind`` is unstructured."""


@dataclass(frozen=True)
class StageContext:
    """What a stage needs to measure and prune a model.

    Attributes:
        example: the input batch for tracing and counting MACs.
        batches: training batches, for data-driven criteria.
        loss_fn: the task's loss, for data-driven criteria.
        size: the structured stage's measure of a model (MACs, parameters or latency).
        baseline_size: the same measure of the unpruned baseline.
    """

    example: Tensor
    batches: Iterable[tuple[Any, Tensor]]
    loss_fn: LossFn
    size: Callable[[nn.Module], float]
    baseline_size: float


@dataclass(frozen=True)
class RoundCut:
    """What one round's pruning did: the masks now in force, and the plan it removed (if any)."""

    masks: Masks | None
    plan: PrunePlan | None


def stage_target(stage: UnstructuredPrune | StructuredStage) -> float:
    """The progress at which the stage is done."""
    return stage.target_sparsity if isinstance(stage, UnstructuredPrune) else stage.target_reduction


def stage_progress(
    stage: UnstructuredPrune | StructuredStage, model: nn.Module, masks: Masks | None, ctx: StageContext
) -> float:
    """How far the stage has come: sparsity of the masks, or the reduction of the measure."""
    if isinstance(stage, UnstructuredPrune):
        return mask_sparsity(masks) if masks else 0.0
    return 1.0 - ctx.size(model) / ctx.baseline_size


def prune_round(
    stage: UnstructuredPrune | StructuredStage,
    model: nn.Module,
    masks: Masks | None,
    *,
    target: float,
    ctx: StageContext,
) -> RoundCut:
    """Prune ``model`` in place until the stage's progress reaches ``target``."""
    if isinstance(stage, UnstructuredPrune):
        new_masks = prune_to(model, stage, sparsity=target, existing=masks, batches=ctx.batches, loss_fn=ctx.loss_fn)
        return RoundCut(masks=new_masks, plan=None)
    plan_for = planner(model, stage.step(), example=ctx.example, batches=ctx.batches, loss_fn=ctx.loss_fn)
    plan = search_ratio(plan_for, model, size=ctx.size, goal=(1.0 - target) * ctx.baseline_size,
                        max_ratio=stage.max_ratio)
    apply_plan(model, plan, mode="remove")
    return RoundCut(masks=None, plan=plan)


def search_ratio(
    plan_for: Planner,
    model: nn.Module,
    *,
    size: Callable[[nn.Module], float],
    goal: float,
    max_ratio: float,
    iterations: int = 12,
) -> PrunePlan:
    """The plan of the smallest channel ratio whose pruned model's ``size`` is at most ``goal``.

    Bisection over the ratio in ``[0, max_ratio]`` (size falls as the ratio grows); each
    probe prunes a copy of ``model`` and measures it. When even ``max_ratio`` misses the
    goal, its plan is returned: the round gets as close as it may.
    """

    def probe(ratio: float) -> tuple[PrunePlan, float]:
        plan = plan_for(ratio)
        return plan, size(apply_plan(copy.deepcopy(model), plan, mode="remove"))

    best, best_size = probe(max_ratio)
    if best_size > goal:
        return best
    low, high = 0.0, max_ratio
    for _ in range(iterations):
        middle = (low + high) / 2
        plan, measured = probe(middle)
        if measured <= goal:
            high, best = middle, plan
        else:
            low = middle
    return best
