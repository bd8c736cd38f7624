"""Benchmark: a structured recipe against one-shot pruning, with ``spiral compare``, at a chosen target.

    python -m bench.structured_spiral recipes/structured_lenet5_mnist.yaml [--out runs/bench] [--target 0.9] [--seeds 1]

Runs `spiralkit.spiral.compare.compare` (the spiral, one-shot + fine-tuning and one-shot +
distillation from one baseline, at the same recovery epochs: see ``spiral compare``) and
prints each seed's run beside the others with its parameters and measured latency.
``--target`` replaces every structured stage's ``target_reduction`` (and names the run after
it), to compare the methods at a harder budget than the recipe's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from spiralkit.spiral.compare import CompareConfig, compare
from spiralkit.spiral.prune import StructuredStage
from spiralkit.spiral.recipe import Recipe, load_recipe

from bench.common import format_table


def with_target(recipe: Recipe, target: float) -> Recipe:
    """The recipe with every structured stage aiming at ``target`` reduction, named after it."""
    stages = tuple(
        StructuredStage.model_validate({**stage.model_dump(), "target_reduction": target})  # checks the range
        if isinstance(stage, StructuredStage) else stage
        for stage in recipe.prune
    )
    return recipe.model_copy(update={"name": f"{recipe.name}_{round(100 * target)}", "prune": stages})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: runs/bench/<recipe name>")
    parser.add_argument("--target", type=float, default=None, help="every structured stage's target_reduction")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per method")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    if args.target is not None:
        recipe = with_target(recipe, args.target)
    comparison = compare(recipe, args.out or Path("runs") / "bench" / recipe.name, CompareConfig(seeds=args.seeds))
    print(format_table(
        ["method", "seed", comparison.metric, "Δ", "MACs ratio", "params", "ms (b=1)", "rounds", "epochs"],
        [
            [method, str(run.seed), f"{run.metric:.2f}", f"{run.metric - comparison.baseline_metric:+.2f}",
             f"{run.macs_ratio:.3f}", f"{run.params:,}", f"{run.latency_ms:.3f}", str(run.rounds), str(run.epochs)]
            for method, result in comparison.methods.items() for run in result.runs
        ],
    ))


if __name__ == "__main__":
    main()
