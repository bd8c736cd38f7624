"""Helpers shared by the typed configs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def kind_from_string(value: Any) -> Any:
    """Let a recipe name a config by its kind alone: ``criterion: taylor`` = ``{kind: taylor}``.

    Used as a pydantic ``BeforeValidator`` on the discriminated unions of configs.
    """
    return {"kind": value} if isinstance(value, str) else value


def default_kind(kind: str) -> Callable[[Any], Any]:
    """A ``BeforeValidator`` giving a mapping without ``kind`` this one (the common case's short form)."""

    def fill(value: Any) -> Any:
        return {"kind": kind, **value} if isinstance(value, dict) and "kind" not in value else value

    return fill
