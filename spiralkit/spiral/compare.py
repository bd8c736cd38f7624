"""`spiral compare`: the spiral against one-shot pruning, from one baseline, at the same recovery budget.

Three methods, each run for every seed (``recipe.seed + i``) from the same trained baseline:

====================  ==============================================================
``spiral``            the recipe as it is: rounds, its recovery, keep or roll back
``oneshot_finetune``  every prune stage straight to its target in one round, recovered
                      by fine-tuning on labels, always kept
``oneshot_distill``   the same one-shot pruning, recovered by the recipe's distillation
                      (default `Distill` settings when the recipe fine-tunes)
====================  ==============================================================

**The same recovery budget.** The spiral's budget is every round it ran, kept or rolled
back: each round's recovery epochs (``recover.train.epochs``, or ``recover.last_epochs`` in
a round reaching its target). Since that depends on the run, the spiral runs
first for each seed; each one-shot method then gets those epochs in its single round per
prune stage (``ceil(epochs / stages)`` each, which is all of them for a one-stage recipe),
with the recipe's ``recover.train`` optimizer and learning-rate schedule. Every method's
``epochs`` is counted from its report the same way.

The baseline is trained once, in ``OUT/baseline``, and every method's recipe names its
``baseline.safetensors`` as ``model.checkpoint`` (with no ``train`` section). Quantize
stages are dropped: the comparison is of pruning and recovery.

```
OUT/baseline/                  the baseline's run (no pruning): trains the model once
OUT/seedI/METHOD/              one run directory per seed and method (resumed when killed)
OUT/compare.json               the results (`Comparison`), with the spiral's lead over each one-shot method
OUT/compare.png, compare.svg   metric against sparsity (unstructured) or MACs kept (structured)
```

A killed comparison resumes: every run directory is a spiral run, continued (or, when
finished, reused) by the next ``spiral compare`` with the same recipe.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from rich import box
from rich.console import Console
from rich.table import Table

from spiralkit.errors import SpiralError
from spiralkit.export import atomic_write_text
from spiralkit.prune.schedules import OneShot
from spiralkit.report import Report
from spiralkit.report.plots import Point, plot_points
from spiralkit.spiral.recipe import Recipe, Targets
from spiralkit.spiral.recovery import Distill, Finetune, Recovery
from spiralkit.spiral.rundir import BASELINE, STATE
from spiralkit.spiral.runner import Spiral
from spiralkit.train import TrainConfig

__all__ = [
    "BASELINE_RUN",
    "COMPARE_JSON",
    "COMPARE_PLOT",
    "COMPARE_SCHEMA",
    "METHODS",
    "ONE_SHOT",
    "CompareConfig",
    "Comparison",
    "Lead",
    "MethodResult",
    "MethodRun",
    "compare",
    "comparison_table",
    "lead",
    "one_shot_recipe",
    "spiral_epochs",
]

COMPARE_SCHEMA = "spiralkit.compare/1"
BASELINE_RUN = "baseline"
COMPARE_JSON = "compare.json"
COMPARE_PLOT = "compare"  # compare.png and compare.svg
NO_ROLLBACK = 1e9
"""A one-shot round's ``max_metric_drop``: it is kept whatever it loses (the comparison is at the same target)."""

ONE_SHOT: dict[str, Callable[[Recipe, TrainConfig], Recovery]] = {
    "oneshot_finetune": lambda recipe, train: Finetune(train=train),
    "oneshot_distill": lambda recipe, train: (
        recipe.recover.model_copy(update={"train": train}) if isinstance(recipe.recover, Distill) else Distill(train=train)
    ),
}
"""The one-shot methods: each one's recovery, given the recipe and the recovery's training (epochs set)."""

METHODS = ("spiral", *ONE_SHOT)
"""Every method, in the order they run for each seed (the spiral first: it sets the budget)."""


@dataclass(frozen=True)
class CompareConfig:
    """How a comparison runs.

    Attributes:
        seeds: how many seeds each method runs (``recipe.seed``, ``recipe.seed + 1``, …).
        allow_code: run a recipe whose model or data names code to import (see `Spiral`).

    Raises:
        SpiralError: ``seeds`` is below 1.
    """

    seeds: int
    allow_code: bool = False

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise SpiralError(f"--seeds must be at least 1 (got {self.seeds}): each method runs once per seed")


class MethodRun(BaseModel):
    """One method's run for one seed.

    Attributes:
        seed: the recipe seed of the run.
        run_dir: the run directory, relative to the comparison's directory.
        metric: the final model's task metric on test data.
        val_metric: the same on the validation split.
        macs_ratio: the final model's MACs over the baseline's.
        sparsity: the final model's share of zero parameters.
        params: the final model's parameters.
        latency_ms: the final model's median latency.
        rounds: rounds run, kept or rolled back.
        epochs: recovery epochs over all rounds (`spiral_epochs`).
    """

    model_config = ConfigDict(extra="forbid")
    seed: int
    run_dir: str
    metric: float
    val_metric: float
    macs_ratio: float
    sparsity: float
    params: int
    latency_ms: float
    rounds: int
    epochs: int


class MethodResult(BaseModel):
    """One method over all seeds: means, standard deviations (0 for one seed) and the runs.

    Attributes:
        metric_mean: mean final metric.
        metric_std: its sample standard deviation over the seeds.
        macs_ratio: mean final/baseline MACs.
        macs_ratio_std: its standard deviation.
        sparsity: mean final sparsity.
        sparsity_std: its standard deviation.
        epochs: mean recovery epochs per run.
        metrics: the final metric of each seed, in seed order.
        runs: each seed's run.
    """

    model_config = ConfigDict(extra="forbid")
    metric_mean: float
    metric_std: float
    macs_ratio: float
    macs_ratio_std: float
    sparsity: float
    sparsity_std: float
    epochs: float
    metrics: list[float]
    runs: list[MethodRun]


class Lead(BaseModel):
    """How far the spiral is ahead of one one-shot method, in the metric's better direction.

    Attributes:
        difference: the spiral's mean metric minus the method's; positive when the spiral is
            better (for a lower-is-better metric, the method's minus the spiral's).
        per_seed: the same difference for each seed's pair of runs, in seed order.
        separated: the spiral's mean − std is beyond the method's mean + std, i.e. the
            difference exceeds the sum of the two standard deviations.
    """

    model_config = ConfigDict(extra="forbid")
    difference: float
    per_seed: list[float]
    separated: bool


def lead(spiral: MethodResult, other: MethodResult, *, higher_is_better: bool) -> Lead:
    """The spiral's `Lead` over ``other``."""
    sign = 1.0 if higher_is_better else -1.0
    difference = sign * (spiral.metric_mean - other.metric_mean)
    return Lead(difference=difference,
                per_seed=[sign * (a - b) for a, b in zip(spiral.metrics, other.metrics, strict=True)],
                separated=difference > spiral.metric_std + other.metric_std)


class Comparison(BaseModel):
    """What ``spiral compare`` measured; written as ``compare.json``.

    Attributes:
        recipe: the recipe's name.
        metric: the task metric's name.
        higher_is_better: the metric's direction.
        axis: what the plot's x axis shows: ``sparsity`` (unstructured recipes) or
            ``macs_ratio`` (recipes with a structured stage).
        baseline_metric: the trained baseline's metric.
        seeds: the recipe seeds run.
        dropped: the recipe's stages left out of the comparison (``quantize``).
        methods: the results by method name (`METHODS`).
        leads: the spiral's lead over each one-shot method, by its name (`ONE_SHOT`).
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    schema_: str = Field(default=COMPARE_SCHEMA, alias="schema")
    recipe: str
    metric: str
    higher_is_better: bool
    axis: Literal["sparsity", "macs_ratio"]
    baseline_metric: float
    seeds: list[int]
    dropped: list[str]
    methods: dict[str, MethodResult]
    leads: dict[str, Lead] = Field(default_factory=dict)


# --------------------------------------------------------------------------- the methods' recipes


def comparable(recipe: Recipe) -> Recipe:
    """The recipe the comparison runs: its quantize stage dropped.

    Raises:
        RecipeError: the recipe has no prune stage, so there is nothing to compare.
    """
    if not recipe.prune:
        raise recipe.error("prune", "the recipe has no prune stage: spiral compare compares ways of pruning")
    return recipe.model_copy(update={"quantize": None})


def baseline_recipe(recipe: Recipe) -> Recipe:
    """The run that trains the baseline once: the recipe without pruning (nor a student).

    The sections that only act on pruning rounds (``recover``, ``targets``) are reset to their
    defaults, so the baseline's fingerprint depends on what trains it alone: a finished run of
    a plain training recipe with the same model, data, training and seed (e.g.
    ``recipes/cifar10_resnet20_finetune.yaml``) can be copied in as ``OUT/baseline`` and reused.
    """
    defaults = {key: Recipe.model_fields[key].get_default(call_default_factory=True) for key in ("recover", "targets")}
    return recipe.model_copy(update={"name": f"{recipe.name}_{BASELINE_RUN}", "prune": (), "student": None} | defaults)


def from_baseline(recipe: Recipe, checkpoint: Path, *, seed: int) -> Recipe:
    """The recipe reading the trained baseline ``checkpoint``, with no training of its own, at ``seed``."""
    model = recipe.model.model_copy(update={"checkpoint": checkpoint})
    return recipe.model_copy(update={"model": model, "train": None, "seed": seed})


def one_shot_recipe(recipe: Recipe, method: str, *, epochs: int) -> Recipe:
    """The recipe as one-shot ``method`` (a key of `ONE_SHOT`) with ``epochs`` of recovery in all.

    Every prune stage goes to its target in one round, recovered for ``ceil(epochs / stages)``
    epochs with the recipe's optimizer and schedule; every round is kept.
    """
    stages = tuple(stage.model_copy(update={"schedule": OneShot()}) for stage in recipe.prune)
    train = recipe.recover.train.model_copy(update={"epochs": math.ceil(epochs / len(stages))})
    recipe = recipe.model_copy(update={"recover": recipe.recover.model_copy(update={"last_epochs": None})})
    targets = Targets(max_metric_drop=NO_ROLLBACK, min_step=recipe.targets.min_step, max_rounds=len(stages))
    return recipe.model_copy(update={"name": f"{recipe.name}_{method}", "prune": stages,
                                     "recover": ONE_SHOT[method](recipe, train), "targets": targets})


def spiral_epochs(report: Report, *, per_round: int) -> int:
    """Recovery epochs a run spent over every round it ran, kept or rolled back.

    Each round's own count (a round reaching its target may recover longer: ``last_epochs``);
    ``per_round`` for rounds of reports that predate the count.
    """
    return sum(per_round if r.epochs is None else r.epochs for r in report.rounds)


# --------------------------------------------------------------------------- running


def _run(recipe: Recipe, run_dir: Path, config: CompareConfig, console: Console) -> Report:
    """Run ``recipe`` in ``run_dir``, or continue (or reuse, when finished) the run already there."""
    spiral = Spiral(recipe, allow_code=config.allow_code)
    return spiral.run(run_dir, resume=(run_dir / STATE).exists(), console=console)


def _method_run(report: Report, recipe: Recipe, *, run_dir: str) -> MethodRun:
    final = report.final
    assert final is not None, "a finished run has a final model"
    return MethodRun(
        seed=recipe.seed, run_dir=run_dir, metric=final.metric, val_metric=final.val_metric,
        macs_ratio=final.macs / report.baseline.macs, sparsity=final.sparsity, params=final.params,
        latency_ms=final.latency_ms, rounds=len(report.rounds),
        epochs=spiral_epochs(report, per_round=recipe.recover.train.epochs),
    )


def _seed_runs(recipe: Recipe, seed_dir: Path, out: Path, config: CompareConfig,
               console: Console) -> dict[str, MethodRun]:
    """Every method for one seed: the spiral, then the one-shot methods with its epochs."""
    spiral = _run(recipe, seed_dir / "spiral", config, console)
    runs = {"spiral": _method_run(spiral, recipe, run_dir=(seed_dir / "spiral").relative_to(out).as_posix())}
    for method in ONE_SHOT:
        method_recipe = one_shot_recipe(recipe, method, epochs=runs["spiral"].epochs)
        console.print(f"[bold]{seed_dir.name} · {method}[/]: {runs['spiral'].epochs} recovery epoch(s), as the spiral")
        report = _run(method_recipe, seed_dir / method, config, console)
        runs[method] = _method_run(report, method_recipe, run_dir=(seed_dir / method).relative_to(out).as_posix())
    return runs


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _summarise(runs: list[MethodRun]) -> MethodResult:
    metric, metric_std = _mean_std([r.metric for r in runs])
    macs, macs_std = _mean_std([r.macs_ratio for r in runs])
    sparsity, sparsity_std = _mean_std([r.sparsity for r in runs])
    return MethodResult(
        metric_mean=metric, metric_std=metric_std, macs_ratio=macs, macs_ratio_std=macs_std,
        sparsity=sparsity, sparsity_std=sparsity_std, epochs=statistics.fmean(r.epochs for r in runs),
        metrics=[r.metric for r in runs], runs=runs,
    )


def compare(recipe: Recipe, out: Path, config: CompareConfig, *, console: Console | None = None) -> Comparison:
    """Run every method of `METHODS` for every seed from one baseline; write and print the results.

    Args:
        recipe: the validated recipe (its quantize stage is dropped).
        out: the comparison's directory (see the module's docstring for its layout).
        config: seeds and whether the recipe may name code.
        console: where progress and the table are printed.

    Returns:
        The comparison, also written as ``out/compare.json`` and plotted as
        ``out/compare.png`` and ``out/compare.svg``.

    Raises:
        RecipeError: the recipe names code without ``allow_code``, or has no prune stage.
        SpiralError: a run directory is in use or holds another recipe's run.
    """
    recipe.check_code(allow_code=config.allow_code)  # before anything is trained or written
    runnable, out, console = comparable(recipe), Path(out), console or Console()
    console.print(f"[bold]baseline[/]: trained once in {out / BASELINE_RUN}")
    baseline = _run(baseline_recipe(runnable), out / BASELINE_RUN, config, console)
    checkpoint = (out / BASELINE_RUN / BASELINE).resolve()
    runs: dict[str, list[MethodRun]] = {method: [] for method in METHODS}
    for index in range(config.seeds):
        seeded = from_baseline(runnable, checkpoint, seed=recipe.seed + index)
        for method, run in _seed_runs(seeded, out / f"seed{index}", out, config, console).items():
            runs[method].append(run)
    results = {method: _summarise(method_runs) for method, method_runs in runs.items()}
    higher = recipe.task.higher_is_better
    comparison = Comparison(
        recipe=recipe.name, metric=recipe.task.metric_name, higher_is_better=higher,
        axis="macs_ratio" if any(stage.removes_structure for stage in recipe.prune) else "sparsity",
        baseline_metric=baseline.baseline.metric, seeds=[recipe.seed + i for i in range(config.seeds)],
        dropped=["quantize"] if recipe.quantize is not None else [],
        methods=results,
        leads={method: lead(results["spiral"], results[method], higher_is_better=higher) for method in ONE_SHOT},
    )
    write_comparison(comparison, out)
    console.print(comparison_table(comparison))
    return comparison


# --------------------------------------------------------------------------- output


_AXES = {"sparsity": "sparsity (share of zero parameters)", "macs_ratio": "MACs kept (final / baseline)"}


def write_comparison(comparison: Comparison, out: Path) -> None:
    """Write ``compare.json`` and the plots ``compare.png`` and ``compare.svg`` into ``out``."""
    atomic_write_text(out / COMPARE_JSON, comparison.model_dump_json(by_alias=True, indent=2) + "\n")
    axis = comparison.axis
    points = [
        Point(label=method, x=getattr(result, axis), x_err=getattr(result, f"{axis}_std"),
              y=result.metric_mean, y_err=result.metric_std)
        for method, result in comparison.methods.items()
    ]
    plot_points(points, out / COMPARE_PLOT, x_label=_AXES[axis], y_label=comparison.metric,
                title=f"{comparison.recipe}: {len(comparison.seeds)} seed(s), mean ± std",
                reference=comparison.baseline_metric)


def comparison_table(comparison: Comparison) -> Table:
    """The comparison as a rich table: mean ± standard deviation of each method, the spiral's leads below."""
    notes = [f"baseline {comparison.metric}: {comparison.baseline_metric:.2f}; seeds {comparison.seeds}",
             "epochs: recovery epochs per run; the one-shot methods get the spiral's (all its rounds)"]
    if comparison.dropped:
        notes.append(f"left out of the comparison: {', '.join(comparison.dropped)}")
    if comparison.leads:
        notes.append("spiral's lead (its mean minus the method's, + when better; apart: beyond both stds): " + ", ".join(
            f"{ahead.difference:+.2f} over {method}{' (apart)' if ahead.separated else ''}"
            for method, ahead in comparison.leads.items()))
    table = Table(box=box.SIMPLE_HEAD, title=f"spiral compare — {comparison.recipe}", caption="\n".join(notes))
    for column in ("method", comparison.metric, "MACs kept", "sparsity", "epochs"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
    for method, r in comparison.methods.items():
        table.add_row(method, f"{r.metric_mean:.2f} ± {r.metric_std:.2f}",
                      f"{r.macs_ratio:.3f} ± {r.macs_ratio_std:.3f}",
                      f"{100 * r.sparsity:.1f}% ± {100 * r.sparsity_std:.1f}", f"{r.epochs:g}")
    return table
