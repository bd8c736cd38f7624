"""Benchmark: the structured spiral against one-shot pruning + fine-tuning at the same budget.

    python -m bench.structured_spiral recipes/structured_lenet5_mnist.yaml [--out runs/bench] [--target 0.9]

Runs the recipe as ``spiral run`` does (``OUT/spiral``), then, from the same trained
baseline, the one-shot alternative (``OUT/oneshot``): every structured stage goes straight
to its target in one round (``schedule: one-shot``), recovered by fine-tuning on labels for
as many epochs as the spiral's kept rounds used in total, and kept whatever it loses (the
comparison is at the same MACs). A run directory that already holds a finished run is
reused. Prints dense, spiral and one-shot test metric, MACs and latency side by side.
``--target`` replaces every structured stage's ``target_reduction`` (and names the run
after it), to compare both at a harder budget than the recipe's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from spiralkit.export import load_state
from spiralkit.models import load_model
from spiralkit.prune.schedules import OneShot
from spiralkit.spiral.prune import StructuredStage
from spiralkit.spiral.recipe import Recipe, Targets, load_recipe
from spiralkit.spiral.recovery import Finetune
from spiralkit.report import Metrics, Report
from spiralkit.spiral.runner import Spiral
from spiralkit.spiral.rundir import BASELINE, STATE

from bench.common import format_table


def one_shot_twin(recipe: Recipe, *, epochs: int) -> Recipe:
    """The recipe with each structured stage in one round, fine-tuned on labels for ``epochs``, always kept."""
    stages = tuple(
        stage.model_copy(update={"schedule": OneShot()}) if isinstance(stage, StructuredStage) else stage
        for stage in recipe.prune
    )
    recover = Finetune(train=recipe.recover.train.model_copy(update={"epochs": epochs}))
    targets = Targets(max_metric_drop=100.0, min_step=recipe.targets.min_step, max_rounds=len(stages))
    return recipe.model_copy(update={"name": f"{recipe.name}_oneshot", "prune": stages, "recover": recover,
                                     "targets": targets})


def with_target(recipe: Recipe, target: float) -> Recipe:
    """The recipe with every structured stage aiming at ``target`` reduction, named after it."""
    stages = tuple(
        StructuredStage.model_validate({**stage.model_dump(), "target_reduction": target})  # checks the range
        if isinstance(stage, StructuredStage) else stage
        for stage in recipe.prune
    )
    return recipe.model_copy(update={"name": f"{recipe.name}_{round(100 * target)}", "prune": stages})


def _run(recipe: Recipe, run_dir: Path, console: Console, **kwargs: object) -> Report:
    if (run_dir / "report.json").exists():
        console.print(f"reusing the finished run in {run_dir}")
        return Report.from_json((run_dir / "report.json").read_text())
    resume = (run_dir / STATE).exists()
    return Spiral(recipe).run(run_dir, resume=resume, console=console, **kwargs)  # type: ignore[arg-type]


def _row(label: str, m: Metrics, baseline: Metrics, rounds: str) -> list[str]:
    return [label, f"{m.metric:.2f}", f"{m.metric - baseline.metric:+.2f}", f"{m.macs:,}",
            f"{m.macs / baseline.macs:.3f}", f"{m.params:,}", f"{m.latency_ms:.3f}",
            f"{baseline.latency_ms / m.latency_ms:.2f}x", rounds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: runs/bench/<recipe name>")
    parser.add_argument("--target", type=float, default=None, help="every structured stage's target_reduction")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    if args.target is not None:
        recipe = with_target(recipe, args.target)
    out = args.out or Path("runs") / "bench" / recipe.name
    console = Console()
    spiral = _run(recipe, out / "spiral", console)
    epochs = recipe.recover.train.epochs * sum(1 for r in spiral.rounds if r.accepted)
    model = load_model(recipe.model)
    model.load_state_dict(load_state(out / "spiral" / BASELINE))
    oneshot = _run(one_shot_twin(recipe, epochs=epochs), out / "oneshot", console, model=model)
    assert spiral.final is not None and oneshot.final is not None
    metric = recipe.task.metric_name
    kept = sum(r.accepted for r in spiral.rounds)
    print(format_table(
        ["model", metric, "Δ", "MACs", "MACs ratio", "params", "ms (b=1)", "speed-up", "rounds"],
        [
            _row("dense", spiral.baseline, spiral.baseline, "-"),
            _row("spiral + distillation", spiral.final, spiral.baseline,
                 f"{kept} kept of {len(spiral.rounds)}, {recipe.recover.train.epochs} epoch(s) each"),
            _row("one-shot + fine-tuning", oneshot.final, spiral.baseline, f"1, {epochs} epoch(s)"),
        ],
    ))


if __name__ == "__main__":
    main()
