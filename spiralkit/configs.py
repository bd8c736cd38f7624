"""Helpers shared by the typed configs: kinds, and the tables that map them to config classes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, GetCoreSchemaHandler
from pydantic_core import PydanticCustomError, PydanticKnownError, core_schema

__all__ = ["KindTable", "by_kind", "default_kind", "kind_from_string"]

M = TypeVar("M", bound=BaseModel)


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


def by_kind(*classes: type[M]) -> dict[str, type[M]]:
    """A table of config classes keyed by their ``kind`` field's default, in the order given.

    Raises:
        TypeError: a class has no ``kind`` default, or two classes share one.
    """
    table: dict[str, type[M]] = {}
    for cls in classes:
        kind = cls.model_fields["kind"].default if "kind" in cls.model_fields else None
        if not isinstance(kind, str):
            raise TypeError(f"{cls.__name__} has no default kind to be looked up by")
        if kind in table:
            raise TypeError(f"{cls.__name__} and {table[kind].__name__} share the kind {kind!r}")
        table[kind] = cls
    return table


@dataclass(frozen=True, eq=False)  # identity equality and hash: `KindTable(...) | None` must hash
class KindTable:
    """``Annotated`` metadata that makes a config field one of a table's classes, chosen by ``kind``.

    The table is read when a value is validated, not when the model using it is built, so a
    class added to the table is accepted by every config typed from it::

        LOSS_TERMS = by_kind(LogitsTerm, HintTerm)
        LossTerm = Annotated[Term, KindTable(LOSS_TERMS, what="loss term")]

        class Distill(BaseModel):
            losses: tuple[LossTerm, ...]

    A value is an instance of a table class (kept as it is), a mapping with a ``kind``
    (validated by that kind's class, whose errors keep their key paths), or a kind's name
    alone (``criterion: taylor``). Errors for a missing or unknown ``kind`` are pydantic's
    own for discriminated unions, listing the known kinds.

    Attributes:
        table: kind → config class; the single place a new kind is added.
        what: what a value is, for error messages (``"loss term"``).
        default: the kind of a mapping without ``kind`` (``None``: ``kind`` is required).
    """

    table: Mapping[str, type[BaseModel]]
    what: str
    default: str | None = None

    def validate(self, value: Any) -> BaseModel:
        """The config ``value`` describes (see the class docstring)."""
        if isinstance(value, tuple(self.table.values())):
            return value
        if isinstance(value, str):
            value = {"kind": value}
        if not isinstance(value, Mapping):
            raise PydanticCustomError(
                "kind_table_type", "Input should be a {what}: a mapping with a kind, or a kind's name",
                {"what": self.what},
            )
        kind = value.get("kind", self.default)
        if kind is None:
            raise PydanticKnownError("union_tag_not_found", {"discriminator": "'kind'"})
        if not isinstance(kind, str) or kind not in self.table:
            raise PydanticKnownError("union_tag_invalid", {
                "discriminator": "'kind'", "tag": str(kind),
                "expected_tags": ", ".join(repr(k) for k in self.table),
            })
        return self.table[kind].model_validate({"kind": kind, **value})

    def models(self) -> list[type[BaseModel]]:
        """The table's classes now (for hints such as "did you mean")."""
        return list(self.table.values())

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        # Serialised by each value's own class: a model dumps its fields whatever the declared type.
        # The JSON schema lists the classes in the table when the model using it is built.
        return core_schema.no_info_plain_validator_function(
            self.validate,
            json_schema_input_schema=core_schema.union_schema([handler.generate_schema(c) for c in self.models()]),
            serialization=core_schema.plain_serializer_function_ser_schema(_dump, info_arg=True),
        )


def _dump(value: BaseModel, info: core_schema.SerializationInfo) -> Any:
    return value.model_dump(mode=info.mode, by_alias=bool(info.by_alias), exclude_unset=info.exclude_unset,
                            exclude_defaults=info.exclude_defaults, exclude_none=info.exclude_none)
