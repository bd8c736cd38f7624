"""The spiral layer: what runs a recipe.

``recipe.yaml → Recipe → baseline → [prune a step → recover → evaluate → keep or roll back]*
→ quantize → report``. Modules: `recipe` (the typed recipe), `runner` (`Spiral`), one module
per stage kind (`prune`, `student`, `quantize`), `recovery` (distil or fine-tune),
`context` (what stages work with, how a model is measured), `rundir` (every file of a
run directory) and `compare` (``spiral compare``: the spiral against one-shot pruning;
imported on its own, since it draws with matplotlib). Only the CLI, ``bench/`` and the public API import this package.
"""

from spiralkit.spiral.prune import PRUNE_STAGES, PruneStage, StructuredStage, UnstructuredStage
from spiralkit.spiral.quantize import QUANTIZE_STAGES, CompactQuant, DynamicInt8Stage, StaticInt8Stage
from spiralkit.spiral.recipe import Recipe, dump_recipe, load_recipe, parse_recipe
from spiralkit.spiral.recovery import RECOVERIES, Distill, Finetune, Recovery, distill
from spiralkit.spiral.runner import Spiral, build_report
from spiralkit.spiral.rundir import RunState, load_run_state
from spiralkit.spiral.student import StudentStage

__all__ = [
    "PRUNE_STAGES",
    "QUANTIZE_STAGES",
    "RECOVERIES",
    "CompactQuant",
    "Distill",
    "DynamicInt8Stage",
    "Finetune",
    "PruneStage",
    "Recipe",
    "Recovery",
    "RunState",
    "Spiral",
    "StaticInt8Stage",
    "StructuredStage",
    "StudentStage",
    "UnstructuredStage",
    "build_report",
    "distill",
    "dump_recipe",
    "load_recipe",
    "load_run_state",
    "parse_recipe",
]
