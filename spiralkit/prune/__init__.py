"""Pruning: importance criteria, masks, schedules and selectors."""

from spiralkit.prune.apply import apply_plan
from spiralkit.prune.config import UnstructuredPrune, prune, prune_to
from spiralkit.prune.importance import (
    Criterion,
    Magnitude,
    Random,
    Taylor,
    magnitude_scores,
    random_scores,
    score_weights,
    taylor_scores,
)
from spiralkit.prune.plan import BlockPlan, GroupPlan, HeadPlan, MemberPlan, PrunePlan, SkippedPlan
from spiralkit.prune.saved import load_pruned, save_pruned
from spiralkit.prune.schedules import AGP, Iterative, OneShot, Schedule, agp_sparsity, next_sparsity
from spiralkit.prune.selectors import Selector, selected_weights
from spiralkit.prune.structured import StructuredPrune, plan_pruning, prune_structured
from spiralkit.prune.structured_importance import (
    APoZ,
    BNScale,
    ChannelCriterion,
    MeanActivation,
    NormRatio,
    StructureScores,
    bn_l1_penalty,
    score_structures,
)
from spiralkit.prune.unstructured import (
    Masks,
    MaskEnforcer,
    Scope,
    apply_masks,
    enforce_masks,
    finalize,
    mask_sparsity,
    masks_for_sparsity,
    masks_for_threshold,
    masks_from_zeros,
)

__all__ = [
    "BlockPlan",
    "GroupPlan",
    "HeadPlan",
    "MemberPlan",
    "PrunePlan",
    "SkippedPlan",
    "StructuredPrune",
    "apply_plan",
    "load_pruned",
    "plan_pruning",
    "prune_structured",
    "save_pruned",
    "APoZ",
    "BNScale",
    "ChannelCriterion",
    "MeanActivation",
    "NormRatio",
    "StructureScores",
    "bn_l1_penalty",
    "score_structures",
    "AGP",
    "Criterion",
    "Iterative",
    "Magnitude",
    "MaskEnforcer",
    "Masks",
    "OneShot",
    "Random",
    "Schedule",
    "Scope",
    "Selector",
    "Taylor",
    "UnstructuredPrune",
    "agp_sparsity",
    "apply_masks",
    "enforce_masks",
    "finalize",
    "magnitude_scores",
    "mask_sparsity",
    "masks_for_sparsity",
    "masks_for_threshold",
    "masks_from_zeros",
    "next_sparsity",
    "prune",
    "prune_to",
    "random_scores",
    "score_weights",
    "selected_weights",
    "taylor_scores",
]
