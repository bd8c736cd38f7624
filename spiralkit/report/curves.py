"""Per-round training curves as typed data: what ``curves.json`` in a run directory holds.

The spiral layer records them as it trains (`spiralkit.spiral.rundir` names the file and
reads and writes it); the report layer draws them, so a report needs no re-run::

    {"schema": "spiralkit.curves/1",
     "trainings": [{"label": "baseline", "round": null, "losses": [0.61, 0.23]},
                   {"label": "round 1", "round": 1, "losses": [0.31], "val_metric": 97.2, "accepted": true}]}

``losses`` are the mean training loss of each epoch (`spiralkit.train.TrainStats.epoch_losses`),
in the objective's own units: a recovery that distils has another loss than the baseline's
training. ``NaN`` (an epoch without steps) is written as JSON's ``NaN``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["CURVES_SCHEMA", "Curves", "TrainingCurve"]

CURVES_SCHEMA = "spiralkit.curves/1"


class TrainingCurve(BaseModel):
    """One training call: its loss per epoch, and for a spiral round what came of it.

    Attributes:
        label: ``baseline`` or ``round N``; one entry per label.
        round: the spiral round (None for the baseline's training).
        losses: the mean training loss of each epoch, in order.
        val_metric: the validation metric after it (a round's; None when not measured).
        accepted: a round kept (True) or rolled back (False); None for the baseline.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")
    label: str
    round: int | None = Field(default=None, ge=1)
    losses: tuple[float, ...] = ()
    val_metric: float | None = None
    accepted: bool | None = None


class Curves(BaseModel):
    """A run's training curves: the baseline's training first, then the rounds in order."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, ser_json_inf_nan="constants")
    schema_: Literal["spiralkit.curves/1"] = Field(default=CURVES_SCHEMA, alias="schema")
    trainings: tuple[TrainingCurve, ...] = ()

    def with_training(self, curve: TrainingCurve) -> Curves:
        """These curves with ``curve`` in place of the entry of the same label (a round run
        again after a resume replaces its first attempt), else added; the baseline stays
        first and rounds stay in order."""
        kept = [c for c in self.trainings if c.label != curve.label]
        ordered = sorted([*kept, curve], key=lambda c: -1 if c.round is None else c.round)
        return self.model_copy(update={"trainings": tuple(ordered)})

    def to_json(self) -> str:
        """The curves as JSON, ``schema`` first."""
        return self.model_dump_json(by_alias=True, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Curves:
        """Parse what `to_json` wrote (pydantic's ValidationError on anything else)."""
        return cls.model_validate_json(text)
