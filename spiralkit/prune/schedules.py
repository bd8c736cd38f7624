"""Sparsity schedules: which sparsity the next round prunes to.

* ``OneShot`` — straight to the target in one round.
* ``Iterative`` — a fixed step of sparsity per round.
* ``AGP`` — gradual polynomial pruning (Zhu & Gupta 2017, "To prune, or not to prune"):
  ``s_k = s_f + (s_i − s_f)·(1 − k/n)³`` for rounds ``k = 1..n``, pruning fast while
  many redundant weights remain and slowly near the target.
* ``Geometric`` — the same share of the remaining weights each round:
  ``1 − s_k = (1 − s_i)·((1 − s_f)/(1 − s_i))^(k/n)``, as Han et al.'s (2015) iterative
  pruning does. Near extreme targets (98%: 2% of the weights left) AGP's last rounds cut the
  remaining weights by 3x or more in one step; a geometric schedule cuts them by the same
  factor every round.
"""

from __future__ import annotations

from functools import singledispatch
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from spiralkit.configs import kind_from_string


class OneShot(BaseModel):
    """Prune to the target in one round."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["one-shot"] = "one-shot"


class Iterative(BaseModel):
    """Add ``step`` sparsity each round (``0.1`` = ten more percent of the weights)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["iterative"] = "iterative"
    step: float = Field(gt=0, lt=1)


class AGP(BaseModel):
    """Gradual polynomial schedule over ``rounds`` rounds starting at ``initial`` sparsity."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["agp"] = "agp"
    rounds: int = Field(gt=0)
    initial: float = Field(default=0.0, ge=0, lt=1)
    exponent: float = Field(default=3.0, gt=0)


class Geometric(BaseModel):
    """The same fraction of the remaining weights pruned each round, over ``rounds`` rounds from ``initial``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["geometric"] = "geometric"
    rounds: int = Field(gt=0)
    initial: float = Field(default=0.0, ge=0, lt=1)


Schedule = Annotated[
    OneShot | Iterative | AGP | Geometric, Field(discriminator="kind"), BeforeValidator(kind_from_string)
]


def agp_sparsity(k: int, *, rounds: int, initial: float, final: float, exponent: float = 3.0) -> float:
    """Sparsity after round ``k`` of ``rounds`` (``k=0`` gives ``initial``, ``k≥rounds`` gives ``final``)."""
    progress = min(max(k, 0), rounds) / rounds
    return final + (initial - final) * (1.0 - progress) ** exponent


@singledispatch
def next_sparsity(schedule: object, *, current: float, target: float, rounds_done: int) -> float:
    """The sparsity the next round should reach, before any rollback halving.

    Args:
        schedule: a ``OneShot``, ``Iterative``, ``AGP`` or ``Geometric`` config.
        current: the model's sparsity now.
        target: the final sparsity.
        rounds_done: accepted rounds so far.
    """
    raise TypeError(f"unknown schedule {type(schedule).__name__}")


@next_sparsity.register
def _(schedule: OneShot, *, current: float, target: float, rounds_done: int) -> float:
    return target


@next_sparsity.register
def _(schedule: Iterative, *, current: float, target: float, rounds_done: int) -> float:
    return min(target, current + schedule.step)


def geometric_sparsity(k: int, *, rounds: int, initial: float, final: float) -> float:
    """Sparsity after round ``k`` of ``rounds`` when each round keeps the same share of the remaining weights."""
    progress = min(max(k, 0), rounds) / rounds
    return 1.0 - (1.0 - initial) * ((1.0 - final) / (1.0 - initial)) ** progress


def _first_ahead(curve: list[float], *, current: float, target: float) -> float:
    # After a rolled-back, halved step the model lags the curve: take the first point of
    # the curve (from this round on) that is still ahead of the current sparsity.
    return next((point for point in curve if point > current + 1e-9), target)


@next_sparsity.register
def _(schedule: AGP, *, current: float, target: float, rounds_done: int) -> float:
    curve = [agp_sparsity(k, rounds=schedule.rounds, initial=schedule.initial, final=target, exponent=schedule.exponent)
             for k in range(rounds_done + 1, schedule.rounds + 1)]
    return _first_ahead(curve, current=current, target=target)


@next_sparsity.register
def _(schedule: Geometric, *, current: float, target: float, rounds_done: int) -> float:
    curve = [geometric_sparsity(k, rounds=schedule.rounds, initial=schedule.initial, final=target)
             for k in range(rounds_done + 1, schedule.rounds + 1)]
    return _first_ahead(curve, current=current, target=target)
