"""The plan of structured pruning as plain data, and its JSON files.

A `PrunePlan` says, for each channel group, attention layer and block, what is kept — by
module *name* — so it is saved as JSON and replays on a fresh copy of the model. It is made
by `spiralkit.prune.structured.plan_pruning` and carried out by
`spiralkit.prune.apply.apply_plan`; `write_plans` / `read_plans` store the plans of successive
rounds in order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from spiralkit.errors import PruneError
from spiralkit.export.weights import atomic_write_text

__all__ = [
    "BlockPlan",
    "GroupPlan",
    "HeadPlan",
    "MemberPlan",
    "PrunePlan",
    "SkippedPlan",
    "plans_json",
    "read_plans",
    "write_plans",
]


class _Plain(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MemberPlan(_Plain):
    """The indices one layer keeps along one side (``role``), out of ``size``."""

    module: str
    role: Literal["out", "in"]
    size: int
    keep: tuple[int, ...]


class GroupPlan(_Plain):
    """One channel group: the kept root channels and what each member layer keeps."""

    id: str
    size: int
    keep: tuple[int, ...]
    members: tuple[MemberPlan, ...]


class HeadPlan(_Plain):
    """One attention layer: the heads it keeps."""

    module: str
    kind: str
    num_heads: int
    head_dim: int
    keep: tuple[int, ...]


class BlockPlan(_Plain):
    """A removed block and its block influence."""

    module: str
    influence: float


class SkippedPlan(_Plain):
    """Something left unpruned, and why."""

    name: str
    reason: str


class PrunePlan(_Plain):
    """What structured pruning keeps: plain data, replayable on a fresh copy of the model.

    Attributes:
        version: Format version.
        groups: Channel groups that lose channels.
        heads: Attention layers that lose heads.
        blocks: Blocks removed whole.
        skipped: Groups, layers and heads left unpruned, with the reason.
    """

    version: Literal[1] = 1
    groups: tuple[GroupPlan, ...] = ()
    heads: tuple[HeadPlan, ...] = ()
    blocks: tuple[BlockPlan, ...] = ()
    skipped: tuple[SkippedPlan, ...] = ()

    def to_json(self) -> str:
        """The plan as compact JSON."""
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> PrunePlan:
        """Read a plan written by `to_json`.

        Raises:
            PruneError: The text is not a valid plan (the message names the bad field).
        """
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise PruneError(f"not a valid prune plan: {exc}") from exc

    def removed(self) -> dict[str, int]:
        """How many root channels / heads / blocks the plan removes."""
        return {
            "channels": sum(g.size - len(g.keep) for g in self.groups),
            "heads": sum(h.num_heads - len(h.keep) for h in self.heads),
            "blocks": len(self.blocks),
        }


def plans_json(plans: Sequence[PrunePlan]) -> str:
    """The plans of successive rounds, in order, as one JSON list."""
    return json.dumps([json.loads(p.to_json()) for p in plans])


def write_plans(path: Path, plans: Sequence[PrunePlan]) -> None:
    """Write the plans of successive rounds, in order, as one JSON list (atomically)."""
    atomic_write_text(Path(path), plans_json(plans))


def read_plans(path: Path) -> tuple[PrunePlan, ...]:
    """Read plans written by `write_plans`.

    Raises:
        PruneError: The file is missing, not JSON, or not a list of plans; the message names it.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PruneError(f"plan file not found: {path}") from None
    except ValueError as exc:
        raise PruneError(f"{path}: not JSON: {exc}") from None
    if not isinstance(raw, list):
        raise PruneError(f"{path} must hold a list of plans, got {type(raw).__name__}")
    try:
        return tuple(PrunePlan.from_json(json.dumps(item)) for item in raw)
    except PruneError as exc:
        raise PruneError(f"{path}: {exc}") from None
