"""Exceptions spiralkit raises for bad input.

Every message names what is wrong: the key, the layer, the file. Catching
``SpiralError`` catches all of them; the CLI turns them into a one-line error.
"""

from __future__ import annotations


class SpiralError(Exception):
    """Base class of every error spiralkit raises on purpose."""


class RecipeError(SpiralError):
    """A recipe key is unknown, mistyped or out of range."""


class DataError(SpiralError):
    """A data set is missing, corrupt or malformed."""


class ModelError(SpiralError):
    """A model spec or checkpoint cannot be loaded."""


class PruneError(SpiralError):
    """A pruning request cannot be carried out (bad selector, bad sparsity)."""


class ConfigError(SpiralError):
    """A config's value does not fit the model it is applied to (a pattern or layer name matches nothing).

    Attributes:
        key: the config's key at fault, relative to the config (``exclude``, ``bits``); the
            spiral prefixes the stage's place in the recipe and reports the recipe's line.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key

    @classmethod
    def naming(cls, error: SpiralError, **patterns: tuple[str, ...] | list[str]) -> ConfigError:
        """``error`` attributed to the first of ``patterns``' keys whose value it quotes (else the first key)."""
        text = str(error)
        key = next((k for k, values in patterns.items() if any(repr(str(v)) in text for v in values)), next(iter(patterns)))
        return cls(key, text)


class StorageError(SpiralError):
    """A file cannot be written or read: disk full, read-only file system, permissions. Names the path."""
