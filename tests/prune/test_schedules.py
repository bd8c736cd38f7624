"""Sparsity schedules: AGP values (Zhu & Gupta 2017), iterative and one-shot steps."""

from __future__ import annotations

import pytest

from spiralkit.errors import RecipeError
from spiralkit.prune import AGP, Geometric, Iterative, OneShot, agp_sparsity, geometric_sparsity, next_sparsity
from spiralkit.spiral.recipe import parse_recipe
from tests.spiral.tiny import TINY


def test_agp_values_match_formula() -> None:
    # s_k = s_f + (s_i − s_f)(1 − k/n)^3 with s_i = 0, s_f = 0.8, n = 4
    values = [agp_sparsity(k, rounds=4, initial=0.0, final=0.8) for k in range(5)]
    assert values == pytest.approx([0.0, 0.4625, 0.7, 0.7875, 0.8])


def test_agp_from_nonzero_initial() -> None:
    assert agp_sparsity(1, rounds=2, initial=0.5, final=0.9) == pytest.approx(0.9 - 0.4 * 0.125)


def test_agp_next_skips_points_already_passed() -> None:
    schedule = AGP(rounds=4)
    assert next_sparsity(schedule, current=0.0, target=0.8, rounds_done=0) == pytest.approx(0.4625)
    # A model that lags the curve (after a halved step) gets the next point ahead of it.
    assert next_sparsity(schedule, current=0.71, target=0.8, rounds_done=1) == pytest.approx(0.7875)
    assert next_sparsity(schedule, current=0.79, target=0.8, rounds_done=4) == pytest.approx(0.8)


def test_iterative_and_one_shot() -> None:
    assert next_sparsity(Iterative(step=0.25), current=0.5, target=0.9, rounds_done=2) == pytest.approx(0.75)
    assert next_sparsity(Iterative(step=0.25), current=0.75, target=0.9, rounds_done=3) == pytest.approx(0.9)
    assert next_sparsity(OneShot(), current=0.0, target=0.9, rounds_done=0) == pytest.approx(0.9)


def test_geometric_keeps_the_same_share_of_the_remaining_weights_each_round() -> None:
    curve = [geometric_sparsity(k, rounds=5, initial=0.0, final=0.98) for k in range(6)]
    assert curve[0] == 0.0 and curve[-1] == pytest.approx(0.98)
    shares = [(1 - after) / (1 - before) for before, after in zip(curve, curve[1:])]
    assert shares == pytest.approx([0.02 ** 0.2] * 5)
    steps, current = [], 0.0
    for done in range(5):
        current = next_sparsity(Geometric(rounds=5), current=current, target=0.98, rounds_done=done)
        steps.append(current)
    assert steps == pytest.approx(curve[1:])


def test_geometric_after_a_rollback_takes_the_next_point_ahead() -> None:
    # a halved step left the model behind round 2's point: the next round aims at round 3's
    lagging = geometric_sparsity(1, rounds=4, initial=0.0, final=0.9) + 0.01
    proposal = next_sparsity(Geometric(rounds=4), current=lagging, target=0.9, rounds_done=2)
    assert proposal == pytest.approx(geometric_sparsity(3, rounds=4, initial=0.0, final=0.9))


def test_geometric_in_a_recipe_and_an_unknown_schedule_named() -> None:
    stage = parse_recipe(TINY.replace("schedule: {kind: one-shot}", "schedule: {kind: geometric, rounds: 3}")).prune[0]
    assert stage.schedule == Geometric(rounds=3)
    with pytest.raises(RecipeError, match="geometric"):
        parse_recipe(TINY.replace("schedule: {kind: one-shot}", "schedule: {kind: geometrik, rounds: 3}"))
