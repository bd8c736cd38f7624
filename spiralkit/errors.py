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
