"""Helpers shared by the typed configs."""

from __future__ import annotations

from typing import Any


def kind_from_string(value: Any) -> Any:
    """Let a recipe name a config by its kind alone: ``criterion: taylor`` = ``{kind: taylor}``.

    Used as a pydantic ``BeforeValidator`` on the discriminated unions of configs.
    """
    return {"kind": value} if isinstance(value, str) else value
