"""Deterministic, class-stratified splits that never change between versions.

Held-out sets must stay the same forever, so that numbers from different runs, machines
and library versions compare. numpy and torch do not promise stable random streams across
releases, so the order used for splitting is defined here from a fixed hash (SplitMix64).
"""

from __future__ import annotations

import numpy as np

from spiralkit.errors import DataError

__all__ = ["count_of", "stable_order", "stratified_split"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def stable_order(n: int, *, seed: int) -> np.ndarray:
    """A pseudo-random permutation of ``range(n)`` that depends only on ``n`` and ``seed``.

    Each index ``i`` gets the key ``splitmix64(seed + (i + 1) * 0x9E3779B97F4A7C15)``
    (mod 2**64); the permutation sorts the keys.

    Args:
        n: Length of the permutation.
        seed: Any non-negative int below 2**64.

    Returns:
        An int64 array holding each of ``0 .. n-1`` once.
    """
    # uint64 array arithmetic wraps modulo 2**64, which is what SplitMix64 wants.
    z = np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN + np.uint64(seed)
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    return np.argsort(z, kind="stable").astype(np.int64)


def count_of(fraction: float, n: int, *, what: str) -> int:
    """``round(fraction * n)``, checked to leave at least one example on each side.

    Args:
        fraction: Share to hold out, 0 < fraction < 1.
        n: Number of examples being split.
        what: What is being split off, for the error message.

    Raises:
        DataError: The split would leave one side empty.
    """
    held = round(fraction * n)
    if not 0 < held < n:
        raise DataError(
            f"{what}: a fraction of {fraction} of {n} examples leaves an empty split; "
            f"use more data or another fraction"
        )
    return held


def stratified_split(
    labels: np.ndarray, *, n_held: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split example indices into (kept, held) with class proportions preserved.

    Class ``c`` with ``n_c`` examples contributes ``n_held * n_c / n`` held examples,
    rounded by largest remainder so the total is exactly ``n_held``. Within a class, the
    held examples are the first ones in ``stable_order(n, seed=seed)``.

    Args:
        labels: One integer class label per example.
        n_held: Number of examples to hold out, ``0 < n_held < n``.
        seed: Seed of `stable_order`.

    Returns:
        ``(kept, held)`` index arrays, each in `stable_order` order (so any prefix of
        ``kept`` is a random-looking subset).
    """
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (n_held / len(labels))
    quotas = np.floor(exact).astype(np.int64)
    by_remainder = np.argsort(-(exact - quotas), kind="stable")
    quotas[by_remainder[: n_held - int(quotas.sum())]] += 1

    order = stable_order(len(labels), seed=seed)
    ordered_labels = labels[order]
    held_mask = np.zeros(len(labels), dtype=bool)
    for cls, quota in zip(classes, quotas, strict=True):
        held_mask[order[ordered_labels == cls][:quota]] = True
    in_order = held_mask[order]
    return order[~in_order], order[in_order]
