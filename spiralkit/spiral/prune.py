"""Pruning stages of the spiral: how far a stage has come, and how one round cuts.

A recipe's ``prune`` section is one stage or a list of them, run in order: e.g. structured
rounds that physically remove channels until the MACs target is met, then unstructured
rounds on what remains (a *hybrid* recipe). Every stage has a target on its own progress
measure and a schedule over it:

====================  ===========================================  ===============================
stage                 progress (0 → target)                         one round
====================  ===========================================  ===============================
`UnstructuredStage`   sparsity of the selected weights               masks to the next sparsity
`StructuredStage`     ``1 − size/size(baseline)``, size = MACs,      removes channels/heads, with
                      parameters or measured latency                 the ratio searched to hit it
                                                                     (latency: per-group widths
                                                                     from a latency table)
====================  ===========================================  ===============================

Each stage kind is one class implementing `PruneStage` (goal, progress, one cut, and its
touch on the recovery objective), listed in `PRUNE_STAGES`; the runner's loop calls the
protocol and never asks which kind it holds. A new kind is one class and one table line.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from spiralkit.configs import KindTable, by_kind
from spiralkit.errors import ConfigError, PruneError
from spiralkit.latency import RUNTIMES, GroupWeight, LatencyPlan, calibration_ms, choose_widths, table_for
from spiralkit.measure import Clock
from spiralkit.layerwise import CalibrationError, check_layer, weight_matrix
from spiralkit.prune.calibrated import CalibratedCriterion
from spiralkit.prune.config import UnstructuredPrune, prune_to
from spiralkit.prune.nm import nm_keep_mask
from spiralkit.prune.importance import LossFn, Magnitude
from spiralkit.prune.schedules import AGP, Schedule
from spiralkit.prune.apply import apply_plan
from spiralkit.prune.plan import PrunePlan
from spiralkit.prune.structured import Planner, StructuredPrune, planner
from spiralkit.prune.structured_importance import ChannelCriterion, bn_l1_penalty
from spiralkit.prune.unstructured import Masks, Scope, mask_sparsity
from spiralkit.train import Objective, Wrapped

__all__ = [
    "PRUNE_STAGES",
    "PruneStage",
    "PruneStageConfig",
    "RoundCut",
    "SizeMeasure",
    "StageContext",
    "StructuredStage",
    "UnstructuredStage",
    "search_ratio",
]

SizeMeasure = Literal["macs", "params", "latency"]


@dataclass(frozen=True)
class StageContext:
    """What a stage needs to measure and prune a model.

    Attributes:
        example: the input batch for tracing and counting MACs.
        batches: training batches, for data-driven criteria.
        loss_fn: the task's loss, for data-driven criteria.
        size: the stage's size measure of a model (MACs, parameters or latency).
        baseline_size: the same measure of the unpruned baseline.
        threads: intra-op threads latency is measured with.
        clock: the clock latency is measured on (``wall`` or ``cpu``).
        relative: a model's size measure over the baseline's, the two measured together
            (latency: timed interleaved, so that a burst of load on a shared machine hits
            both alike); None: ``size(model) / baseline_size``.
    """

    example: Tensor
    batches: Iterable[tuple[Any, Tensor]]
    loss_fn: LossFn
    size: Callable[[nn.Module], float]
    baseline_size: float
    threads: int = 1
    clock: Clock = "wall"
    relative: Callable[[nn.Module], float] | None = None

    def ratio(self, model: nn.Module) -> float:
        """``model``'s size measure as a fraction of the baseline's."""
        return self.relative(model) if self.relative is not None else self.size(model) / self.baseline_size


@dataclass(frozen=True)
class RoundCut:
    """What one round's pruning did: the masks now in force, and the plan it removed (if any).

    A latency-constrained cut also says what its latency table predicted for the pruned
    model and what one end-to-end measurement of it gave (milliseconds).
    """

    masks: Masks | None
    plan: PrunePlan | None
    predicted_ms: float | None = None
    measured_ms: float | None = None


class PruneStage(Protocol):
    """What the spiral asks of a pruning stage; each stage kind implements it.

    Attributes:
        kind: the recipe's name of the stage kind.
        size_measure: the model size the stage's progress is measured on.
        runtime: where latency is measured (a name in `spiralkit.latency.RUNTIMES`; None: ``eager``).
        removes_structure: the stage makes the model physically smaller (it must come
            before stages that only mask weights).
    """

    kind: str
    size_measure: SizeMeasure
    runtime: str | None
    removes_structure: ClassVar[bool]

    @property
    def goal(self) -> float:
        """The progress at which the stage is done."""
        ...

    @property
    def progress_name(self) -> str:
        """What the progress is, for the report (``sparsity``, ``macs reduction``…)."""
        ...

    @property
    def schedule(self) -> Schedule:
        """How the rounds approach the goal."""
        ...

    def progress(self, model: nn.Module, masks: Masks | None, ctx: StageContext) -> float:
        """How far the stage has come with ``model`` (and the masks in force)."""
        ...

    def cut(self, model: nn.Module, masks: Masks | None, *, target: float, ctx: StageContext) -> RoundCut:
        """Prune ``model`` in place until the stage's progress reaches ``target``."""
        ...

    def recovery(self, objective: Objective) -> Objective:
        """The recovery objective of this stage's rounds, built on the recipe's."""
        ...


class UnstructuredStage(UnstructuredPrune):
    """Unstructured spiral rounds: masks to the schedule's next sparsity (see `UnstructuredPrune`).

    With ``criterion: wanda`` or ``sparsegpt`` a round is a one-shot calibration step (layer by
    layer, on the first ``samples`` training examples; SparseGPT also updates the kept weights),
    and with a ``pattern`` the round prunes straight to N:M. Recovery then keeps the masks.
    """

    size_measure: ClassVar[SizeMeasure] = "macs"
    runtime: ClassVar[str | None] = None
    removes_structure: ClassVar[bool] = False

    @property
    def goal(self) -> float:
        """The target sparsity."""
        return self.target_sparsity

    @property
    def progress_name(self) -> str:
        """``sparsity``."""
        return "sparsity"

    def progress(self, model: nn.Module, masks: Masks | None, ctx: StageContext) -> float:
        """The sparsity of the masks in force."""
        return mask_sparsity(masks) if masks else 0.0

    def cut(self, model: nn.Module, masks: Masks | None, *, target: float, ctx: StageContext) -> RoundCut:
        """Prune the selected weights to sparsity ``target``; what ``masks`` pruned stays pruned."""
        new_masks = prune_to(model, self, sparsity=target, existing=masks, batches=ctx.batches, loss_fn=ctx.loss_fn)
        return RoundCut(masks=new_masks, plan=None)

    def recovery(self, objective: Objective) -> Objective:
        """The recipe's recovery, unchanged."""
        return objective

    def check(self, model: nn.Module, example: Tensor) -> None:
        """Every include/exclude pattern must match a prunable layer of ``model``; an N:M pattern
        must fit every selected layer's width, and a calibration method must apply to every layer."""
        try:
            layers = self.selector.select(model)
        except PruneError as exc:
            raise ConfigError.naming(exc, exclude=self.exclude, include=self.include) from None
        if isinstance(self.criterion, CalibratedCriterion):
            for name, layer in layers.items():
                try:
                    check_layer(name, layer)
                except CalibrationError as exc:
                    raise ConfigError("criterion", str(exc)) from None
        if self.pattern is not None:
            for name, layer in layers.items():
                try:
                    nm_keep_mask(weight_matrix(layer).detach(), self.pattern, name=name)
                except PruneError as exc:
                    raise ConfigError("pattern", str(exc)) from None


class StructuredStage(BaseModel):
    """Structured spiral rounds: remove channels and heads until a MACs, parameter or latency target.

    Each round searches the channel ratio whose removal brings the model to the next point
    of the schedule (e.g. 30% → 50% → 65% → 70% fewer MACs than the baseline) and removes
    those channels physically; recovery then distils from the unpruned model. With
    ``measure: latency`` a round instead chooses every group's width from a latency table of
    the model's blocks on ``runtime`` (`spiralkit.latency.planner`), keeping the most
    importance within the predicted latency, and checks the prediction with one measurement.

    Attributes:
        measure: what the target is on — ``macs``, ``params`` or ``latency`` (measured on
            ``runtime`` at the recipe's ``measure`` batch size and threads).
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
        runtime: where ``measure: latency`` is measured and tabled: ``eager`` (PyTorch, the
            default), ``ort`` (ONNX Runtime fp32), ``ort_int8`` (ONNX Runtime on spiralkit's
            static int8: plan for the kernels a quantize stage will run), ``openvino`` /
            ``openvino_bf16`` (OpenVINO, optional); see `spiralkit.latency.RUNTIMES`.
        width_step: with ``measure: latency``, group widths are multiples of this (or whole;
            default 8). Both default to None so that recipes without them keep their
            fingerprint (a missing key and None compare equal).
        group_weight: with ``measure: latency``, how the planner compares groups' importance:
            ``equal``, ``layers`` (a channel is worth the number of layers it lives in: a
            residual stream shared by many layers costs what cutting each of them would) or
            ``weights`` (the weights it holds); see `spiralkit.latency.group_weights`. None
            (the default, as ``width_step``) is ``equal``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    removes_structure: ClassVar[bool] = True
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
    runtime: str | None = None
    width_step: int | None = Field(default=None, ge=1)
    group_weight: GroupWeight | None = None

    @field_validator("runtime")
    @classmethod
    def _known_runtime(cls, value: str | None) -> str | None:
        if value is not None and value not in RUNTIMES:
            raise ValueError(f"unknown runtime {value!r}; known runtimes: {', '.join(RUNTIMES)}")
        if value is not None and (why := RUNTIMES[value].missing) is not None:
            raise ValueError(f"runtime {value!r} is {why}")
        return value

    @property
    def size_measure(self) -> SizeMeasure:
        """The measure the target reduction is on."""
        return self.measure

    @property
    def goal(self) -> float:
        """The target reduction."""
        return self.target_reduction

    @property
    def progress_name(self) -> str:
        """``macs reduction``, ``params reduction`` or ``latency reduction``."""
        return f"{self.measure} reduction"

    def step(self, ratio: float = 0.0) -> StructuredPrune:
        """The one-shot structured pruning config of a round with this channel ratio."""
        return StructuredPrune(
            criterion=self.criterion, ratio=ratio, scope=self.scope, include=self.include, exclude=self.exclude,
            round_to=self.round_to, heads=self.heads,
        )

    def progress(self, model: nn.Module, masks: Masks | None, ctx: StageContext) -> float:
        """The reduction of the size measure against the baseline's (latency: timed beside the baseline)."""
        return 1.0 - ctx.ratio(model)

    def cut(self, model: nn.Module, masks: Masks | None, *, target: float, ctx: StageContext) -> RoundCut:
        """Remove the channels of the ratio (or, for latency, the widths) that bring the size measure to ``target``."""
        plan_for = planner(model, self.step(), example=ctx.example, batches=ctx.batches, loss_fn=ctx.loss_fn)
        if self.measure == "latency":
            return self._latency_cut(plan_for, model, target=target, ctx=ctx)
        plan = search_ratio(plan_for, model, size=ctx.size, goal=(1.0 - target) * ctx.baseline_size,
                            max_ratio=self.max_ratio)
        apply_plan(model, plan, mode="remove")
        return RoundCut(masks=None, plan=plan)

    def _latency_cut(self, plan_for: Planner, model: nn.Module, *, target: float, ctx: StageContext) -> RoundCut:
        """Widths from the latency table within ``(1 − target)·baseline`` ms.

        The prediction is calibrated on the model and its narrowest copy (measured
        interleaved) and checked by timing the pruned model beside the baseline; when that
        misses the round's target, the widths are chosen once more for a target lowered by
        the miss. The round records the prediction and the check of the model it keeps (its
        ratio to the baseline, in the baseline's terms); the stage's size measure times the model
        before the cut once, to put the table's milliseconds in its terms. A stage target
        that even the narrowest widths miss is an error (in its first round, before any
        recovery); a round's own target is approached as closely as the widths allow.

        Raises:
            LatencyError: even the narrowest widths miss the stage's ``target_reduction``.
        """
        runtime, step = self.runtime or "eager", self.width_step or 8
        blocks, table = table_for(plan_for, model, ctx.example, runtime=runtime, threads=ctx.threads, step=step,
                                  clock=ctx.clock)
        full_ms, narrowest_ms = calibration_ms(model, plan_for, ctx.example, runtime=runtime, threads=ctx.threads,
                                               step=step, max_ratio=self.max_ratio, clock=ctx.clock)
        # Targets in the calibration's terms: interleaved minima read lower than the stage's own
        # measure (a median), so the goal is scaled by the model's latency in both.
        scale = full_ms / ctx.size(model)

        def widths(reduction: float, *, strict: bool, correction: float = 1.0) -> LatencyPlan:
            return choose_widths(plan_for, blocks, table,
                                 target_ms=(1.0 - reduction) * ctx.baseline_size * scale * correction,
                                 measured_ms=full_ms, narrowest_ms=narrowest_ms, step=step, max_ratio=self.max_ratio,
                                 strict=strict, weigh=self.group_weight or "equal")

        if narrowest_ms > (1.0 - self.target_reduction) * ctx.baseline_size * scale:
            widths(self.target_reduction, strict=True)  # the stage's goal is out of reach: the error names the key
        chosen = widths(target, strict=False)
        measured = ctx.ratio(apply_plan(copy.deepcopy(model), chosen.plan, mode="remove"))
        if measured > 1.0 - target:  # the prediction was optimistic: plan once more for less, by the miss
            retry = widths(target, strict=False, correction=(1.0 - target) / measured)
            if retry.counts != chosen.counts:
                chosen = retry
                measured = ctx.ratio(apply_plan(copy.deepcopy(model), chosen.plan, mode="remove"))
        apply_plan(model, chosen.plan, mode="remove")
        predicted = chosen.predicted_ms / scale  # back in the stage measure's terms, like the measurement
        return RoundCut(masks=None, plan=chosen.plan, predicted_ms=predicted, measured_ms=measured * ctx.baseline_size)

    def recovery(self, objective: Objective) -> Objective:
        """The recipe's recovery, plus network slimming's batch-norm penalty when asked for."""
        if self.bn_penalty == 0:
            return objective
        strength = self.bn_penalty
        return Wrapped(objective, lambda base, model, x, y: base(model, x, y) + bn_l1_penalty(model, strength))

    def check(self, model: nn.Module, example: Tensor) -> None:
        """The stage plans on ``model``: its include/exclude patterns match layers it can prune.

        Plans on a copy, by magnitude (no data needed) and with the random state restored,
        so checking changes nothing in the run.
        """
        try:
            with torch.random.fork_rng():
                planner(copy.deepcopy(model), self.step().model_copy(update={"criterion": Magnitude(norm=2)}),
                        example=example)
        except PruneError as exc:
            raise ConfigError.naming(exc, exclude=self.exclude, include=self.include) from None


PRUNE_STAGES: dict[str, type[BaseModel]] = by_kind(UnstructuredStage, StructuredStage)
"""The pruning stage kinds a recipe can name: a new kind is a `PruneStage` class and a line here."""

PruneStageConfig = Annotated[PruneStage, KindTable(PRUNE_STAGES, what="pruning stage", default="unstructured")]
"""One pruning stage of a recipe; a mapping without ``kind`` is unstructured."""


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
