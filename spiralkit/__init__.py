"""spiralkit: make trained PyTorch models smaller and faster.

The public API, re-exported explicitly; importing it has no side effects.
"""

from spiralkit.data import DataSpec, DataSplits, load_data
from spiralkit.distill import Tap, TeacherCache, kd_loss
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
from spiralkit.prune.students import NarrowStudent, ShallowStudent, build_student
from spiralkit.quant.ptq import DynamicInt8, StaticInt8, quantize
from spiralkit.report import Report
from spiralkit.spiral import Distill, Finetune, Recipe, Spiral, StructuredStage, distill, load_recipe, parse_recipe
from spiralkit.tasks import Classification, EmbeddingFidelity, evaluate

__all__ = [
    "Classification",
    "DataError",
    "DataSpec",
    "DataSplits",
    "Distill",
    "DynamicInt8",
    "EmbeddingFidelity",
    "Finetune",
    "ModelError",
    "ModelSpec",
    "NarrowStudent",
    "PruneError",
    "PrunePlan",
    "Recipe",
    "RecipeError",
    "Report",
    "ShallowStudent",
    "Spiral",
    "SpiralError",
    "StaticInt8",
    "StructuredPrune",
    "StructuredStage",
    "Tap",
    "TeacherCache",
    "UnstructuredPrune",
    "apply_plan",
    "build_student",
    "distill",
    "enforce_masks",
    "evaluate",
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
