"""spiralkit: make trained PyTorch models smaller and faster.

The public API, re-exported explicitly; importing it has no side effects.
"""

from spiralkit.data import DataSpec, DataSplits, load_data
from spiralkit.distill import Distill, Finetune, distill, kd_loss
from spiralkit.errors import DataError, ModelError, PruneError, RecipeError, SpiralError
from spiralkit.models import ModelSpec, load_model
from spiralkit.prune import (
    PrunePlan,
    StructuredPrune,
    UnstructuredPrune,
    apply_plan,
    enforce_masks,
    finalize,
    plan_pruning,
    prune,
)
from spiralkit.quant.ptq import DynamicInt8, StaticInt8, quantize
from spiralkit.recipe import Recipe, load_recipe, parse_recipe
from spiralkit.report import Report
from spiralkit.runner import Spiral

__all__ = [
    "DataError",
    "DataSpec",
    "DataSplits",
    "DynamicInt8",
    "Distill",
    "Finetune",
    "ModelError",
    "ModelSpec",
    "PrunePlan",
    "PruneError",
    "Recipe",
    "RecipeError",
    "Report",
    "Spiral",
    "SpiralError",
    "StaticInt8",
    "StructuredPrune",
    "UnstructuredPrune",
    "apply_plan",
    "distill",
    "enforce_masks",
    "finalize",
    "kd_loss",
    "load_data",
    "load_model",
    "load_recipe",
    "parse_recipe",
    "plan_pruning",
    "prune",
    "quantize",
]
