"""What every stage of a run works with (`RunContext`), and how the spiral measures a model."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
import torch
from torch import Tensor, nn

from spiralkit.data import DataSplits
from spiralkit.distill.cache import TeacherCache
from spiralkit.errors import SpiralError
from spiralkit.export.onnx import OrtModel
from spiralkit.latency import interleaved_ms, latency_of
from spiralkit.measure import count_macs, count_params, measure_latency, size_on_disk
from spiralkit.parallel import SINGLE, World
from spiralkit.report import Metrics
from spiralkit.spiral.prune import PruneStage, StageContext
from spiralkit.tasks import evaluate

if TYPE_CHECKING:  # the recipe names the stages, which use the context: no import cycle at run time
    from spiralkit.spiral.recipe import Recipe
    from spiralkit.spiral.recovery import Recovery

__all__ = ["RunContext", "diverged", "example_input", "measure_here", "measure_model", "stage_context"]


@dataclass
class RunContext:
    """What every stage of a run works with, passed explicitly.

    ``recover`` is the recipe's recovery fitted to the data (`spiralkit.spiral.recovery.fitted_to`).
    ``baseline_latency`` holds the baseline's latency per runtime once measured (eager's is
    the baseline's ``latency_ms``), so every round's progress is against the same number.
    ``world`` is the data-parallel processes of the run (torchrun); ``data.train`` is the whole
    training data on every rank, and training takes each rank's share of it.
    """

    recipe: Recipe
    data: DataSplits
    teacher: nn.Module
    reference: nn.Module  # the teacher through a cache of its outputs, for tasks that compare with it
    example: Tensor
    run_dir: Path
    console: Console
    recover: Recovery
    cache: TeacherCache | None = None
    baseline_latency: dict[str, float] = field(default_factory=dict)
    world: World = SINGLE


def example_input(data: DataSplits, batch_size: int) -> Tensor:
    """A fixed input of ``batch_size`` real examples, for MACs and latency."""
    x, _ = next(iter(data.val))
    repeats = -(-batch_size // x.shape[0])
    return x.repeat(repeats, *([1] * (x.dim() - 1)))[:batch_size].clone()


def _latency_ms(model: nn.Module, ctx: RunContext) -> float:
    measure = ctx.recipe.measure
    return measure_latency(
        model, ctx.example, threads=measure.threads, warmup=measure.warmup, repeats=measure.repeats, clock=measure.clock
    ).median_ms


def measure_model(model: nn.Module, ctx: RunContext) -> Metrics:
    """Evaluate and measure ``model``: metric, parameters, size on disk, MACs, latency.

    With several processes (whose models are the same) rank 0 alone measures, while the
    others wait, and every rank gets its numbers: the evaluation is not repeated, the
    latency is timed without other ranks competing for the cores, and every rank takes the
    same keep or roll-back decision from them.
    """
    return ctx.world.broadcast(measure_here(model, ctx) if ctx.world.main else None)


def measure_here(model: nn.Module, ctx: RunContext) -> Metrics:
    """`measure_model` in this process alone (no other rank takes part)."""
    recipe = ctx.recipe
    held_out = ctx.data.test if ctx.data.test is not None else ctx.data.val
    params = count_params(model)
    with tempfile.TemporaryDirectory() as scratch:
        size = size_on_disk(model, Path(scratch))
    latency = _latency_ms(model, ctx)
    return Metrics(
        metric=evaluate(recipe.task, model, held_out, reference=ctx.reference).metric,
        val_metric=evaluate(recipe.task, model, ctx.data.val, reference=ctx.reference).metric,
        params=params.total,
        nonzero_params=params.nonzero,
        sparsity=params.sparsity,
        size_bytes=size.best_bytes,
        dense_size_bytes=size.dense_bytes,
        macs=count_macs(model, ctx.example),
        latency_ms=latency,
        latency_runtime="ort" if isinstance(model, OrtModel) else "eager",
        latency_batch_size=int(ctx.example.shape[0]),
        latency_threads=recipe.measure.threads,
    )


def _runtime_latency_ms(model: nn.Module, runtime: str, ctx: RunContext) -> float:
    measure = ctx.recipe.measure
    return latency_of(model, ctx.example, runtime=runtime, threads=measure.threads, warmup=measure.warmup,
                      repeats=measure.repeats, clock=measure.clock).median_ms


def _size_measure(stage: PruneStage, baseline: Metrics, ctx: RunContext) -> tuple[Callable[[nn.Module], float], float]:
    """A stage's measure of a model's size, and the baseline's value of it.

    Latency on a runtime other than eager PyTorch is measured there, the baseline's (the
    frozen teacher's) once per run.
    """
    name, runtime = stage.size_measure, stage.runtime or "eager"
    if name == "macs":
        return (lambda m: float(count_macs(m, ctx.example))), float(baseline.macs)
    if name == "params":
        return (lambda m: float(count_params(m).total)), float(baseline.params)
    if runtime == "eager":
        return (lambda m: _latency_ms(m, ctx)), baseline.latency_ms
    if runtime not in ctx.baseline_latency:
        ctx.baseline_latency[runtime] = _runtime_latency_ms(ctx.teacher, runtime, ctx)
    return (lambda m: _runtime_latency_ms(m, runtime, ctx)), ctx.baseline_latency[runtime]


def _relative_latency(model: nn.Module, runtime: str, ctx: RunContext) -> float:
    """``model``'s latency over the baseline's (the frozen teacher's), the two timed interleaved."""
    measure = ctx.recipe.measure
    model_ms, baseline_ms = interleaved_ms([(model, ctx.example), (ctx.teacher, ctx.example)], runtime=runtime,
                                           threads=measure.threads, warmup=measure.warmup,
                                           repeats=max(1, measure.repeats // 3), clock=measure.clock)
    return model_ms / baseline_ms


def stage_context(stage: PruneStage, baseline: Metrics, ctx: RunContext) -> StageContext:
    """What ``stage`` needs from the run to measure and prune a model.

    A latency stage's progress times the model beside the baseline (`_relative_latency`):
    against a baseline timed once, a burst of load during that one measurement made an
    unpruned model look faster than it.
    """
    size, baseline_size = _size_measure(stage, baseline, ctx)
    relative = None
    if stage.size_measure == "latency":
        runtime = stage.runtime or "eager"
        relative = lambda model: _relative_latency(model, runtime, ctx)  # noqa: E731
    return StageContext(example=ctx.example, batches=ctx.data.train, loss_fn=ctx.recipe.task.loss,
                        size=size, baseline_size=baseline_size, threads=ctx.recipe.measure.threads,
                        clock=ctx.recipe.measure.clock, relative=relative)


def _first_nonfinite_batch(batches: Iterable[tuple[object, Tensor]]) -> int | None:
    """The index of the first batch whose floating-point inputs hold NaN or inf, or None."""
    for index, (x, _) in enumerate(batches):
        if isinstance(x, Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            return index
    return None


def diverged(what: str, error: Exception, batches: Iterable[tuple[object, Tensor]], *, key: str) -> SpiralError:
    """The error for a training whose loss turned NaN/inf: the data's fault when its inputs are not
    finite, else the learning rate named by recipe ``key``."""
    bad = _first_nonfinite_batch(batches)
    if bad is not None:
        return SpiralError(f"{what} cannot work: training batch {bad} holds NaN or inf inputs; clean the data")
    return SpiralError(f"{what} diverged ({error}); lower recipe key {key!r}")
