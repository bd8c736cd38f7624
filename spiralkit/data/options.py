"""Validating a built-in data set's ``data.kwargs`` into its typed options."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from spiralkit.errors import DataError

__all__ = ["data_options"]

Options = TypeVar("Options", bound=BaseModel)


def data_options(options: type[Options], kwargs: Mapping[str, Any], *, name: str) -> Options:
    """Validate ``data.kwargs`` of data set ``name`` into ``options``.

    Args:
        options: The data set's options model (``extra="forbid"``).
        kwargs: The recipe's ``data.kwargs``.
        name: The data set, named in the message.

    Returns:
        The validated options.

    Raises:
        DataError: An unknown key or a bad value, named in the message with the accepted keys.
    """
    try:
        return options.model_validate(dict(kwargs))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'kwargs'}: {error['msg']}" for error in exc.errors()
        )
        accepted = ", ".join(options.model_fields)
        raise DataError(f"data set {name!r}: bad data.kwargs ({problems}); accepted keys: {accepted}") from None
