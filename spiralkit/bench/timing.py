"""Interleaved timing: every candidate is called once per round, so drift hits all alike.

On a shared machine the speed of the CPU drifts (other jobs, frequency, caches). Timing one
model after another lets that drift decide a comparison; calling the candidates round-robin
(``A B C, B C A, C A B, ...``: the order rotates so none is always first) spreads it over
all of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["Timing", "time_interleaved"]


@dataclass(frozen=True)
class Timing:
    """Wall-clock times of one candidate, in milliseconds.

    Attributes:
        median_ms: Median over the timed calls.
        p10_ms: 10th percentile (linear interpolation).
        p90_ms: 90th percentile.
        repeats: Timed calls.
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int


def time_interleaved(calls: Mapping[str, Callable[[], object]], *, warmup: int, repeats: int) -> dict[str, Timing]:
    """Time every call of ``calls`` ``repeats`` times, round-robin, after ``warmup`` untimed rounds.

    Args:
        calls: Candidate name → a call that runs it once (and returns when it is done).
        warmup: Untimed rounds first (lazy initialisation, caches, allocators).
        repeats: Timed rounds; each calls every candidate once, starting one further along.

    Returns:
        Candidate name → its `Timing`, in the order of ``calls``.

    Raises:
        ValueError: ``repeats`` below 1 or ``warmup`` below 0.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0; got {repeats=}, {warmup=}")
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: _timing(values) for name, values in times.items()}


def _timing(values: list[float]) -> Timing:
    p10, median, p90 = np.percentile(values, [10, 50, 90])
    return Timing(median_ms=float(median), p10_ms=float(p10), p90_ms=float(p90), repeats=len(values))
