"""Pruning stages: the ratio search behind structured rounds, and progress per stage kind."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from spiralkit.measure import count_params
from spiralkit.prune.apply import apply_plan
from spiralkit.prune.structured import planner
from spiralkit.spiral.prune import StageContext, StructuredStage, UnstructuredStage, search_ratio


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()


def params(model: nn.Module) -> float:
    return float(count_params(model).total)


def context(model: nn.Module) -> StageContext:
    return StageContext(example=torch.randn(2, 16), batches=(), loss_fn=nn.functional.cross_entropy,
                        size=params, baseline_size=params(model))


def test_search_finds_the_smallest_ratio_that_meets_the_goal() -> None:
    model = mlp()
    stage = StructuredStage(target_reduction=0.5)
    plan_for = planner(model, stage.step(), example=torch.randn(2, 16))
    goal = 0.5 * params(model)
    plan = search_ratio(plan_for, model, size=params, goal=goal, max_ratio=0.9)
    pruned = apply_plan(copy.deepcopy(model), plan, mode="remove")
    assert params(pruned) <= goal
    # One channel fewer removed from each hidden layer would miss the goal: the search did not overshoot.
    widths = [len(g.keep) for g in plan.groups]
    assert all(w < 64 for w in widths)
    bigger = apply_plan(copy.deepcopy(model), plan_for(1 - (max(widths) + 1) / 64), mode="remove")
    assert params(bigger) > goal


def test_unreachable_goal_takes_the_largest_ratio() -> None:
    model = mlp()
    plan_for = planner(model, StructuredStage(target_reduction=0.5).step(), example=torch.randn(2, 16))
    plan = search_ratio(plan_for, model, size=params, goal=1.0, max_ratio=0.5)
    assert [len(g.keep) for g in plan.groups] == [32, 32]


def test_structured_round_removes_to_the_target_and_reports_progress() -> None:
    model = mlp()
    ctx = context(model)
    stage = StructuredStage(measure="params", target_reduction=0.6)
    assert stage.goal == 0.6 and stage.progress(model, None, ctx) == 0.0
    cut = stage.cut(model, None, target=0.6, ctx=ctx)
    assert cut.masks is None and cut.plan is not None
    assert model[0].out_features < 64  # physically smaller
    assert stage.progress(model, None, ctx) >= 0.6


def test_unstructured_round_masks_to_the_sparsity() -> None:
    model = mlp()
    stage = UnstructuredStage(target_sparsity=0.5)
    cut = stage.cut(model, None, target=0.3, ctx=context(model))
    assert cut.plan is None and cut.masks is not None
    assert stage.progress(model, cut.masks, context(model)) == pytest.approx(0.3, abs=0.01)
