"""Sparsity schedules: AGP values (Zhu & Gupta 2017), iterative and one-shot steps."""

from __future__ import annotations

import pytest

from spiralkit.prune import AGP, Iterative, OneShot, agp_sparsity, next_sparsity


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
