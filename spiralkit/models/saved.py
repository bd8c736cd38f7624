"""A model saved as data: the spec that builds its original, the JSON that reshapes it, its weights.

Pruned models (`spiralkit.prune.saved`) and students (`spiralkit.prune.students`) are both
an original model changed by recorded steps — prune plans, a student layout. Both are saved
the same way, by `save_built`: ``spec.json`` (the `ModelSpec`, without its checkpoint), one
JSON file per recorded step, and ``weights.safetensors``. `read_built` checks such a
directory and returns its spec; the caller rebuilds the architecture from its own files and
loads the weights with `load_built_weights`. Nothing is pickled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import ValidationError
from torch import nn

from spiralkit.errors import SpiralError
from spiralkit.export.weights import atomic_write_text, save_weights
from spiralkit.models.loading import ModelSpec, load_weights

__all__ = ["SPEC_FILENAME", "WEIGHTS_FILENAME", "load_built_weights", "read_built", "save_built"]

SPEC_FILENAME = "spec.json"
WEIGHTS_FILENAME = "weights.safetensors"


def save_built(model: nn.Module, directory: Path, *, spec: ModelSpec, steps: Mapping[str, str]) -> Path:
    """Save ``model`` as its original's spec, the JSON ``steps`` (file name → text) and its weights.

    Every file is written atomically; ``directory`` is created if missing.

    Returns:
        ``directory``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / SPEC_FILENAME, spec.model_copy(update={"checkpoint": None}).model_dump_json(indent=2))
    for filename, text in steps.items():
        atomic_write_text(directory / filename, text)
    save_weights(model, directory / WEIGHTS_FILENAME)
    return directory


def read_built(directory: Path, *, steps: Sequence[str], what: str, error: type[SpiralError]) -> ModelSpec:
    """The spec of a model saved by `save_built` with ``steps``, once every file is found there.

    Args:
        directory: The saved model's directory.
        steps: The step files the caller needs.
        what: What the directory should hold, for messages (``"pruned model"``).
        error: The error type to raise.

    Raises:
        error: A file is missing, or ``spec.json`` is not a model spec; the message names it.
    """
    directory = Path(directory)
    for filename in (SPEC_FILENAME, *steps, WEIGHTS_FILENAME):
        if not (directory / filename).is_file():
            raise error(f"{directory} is not a saved {what}: {filename} is missing")
    try:
        return ModelSpec.model_validate_json((directory / SPEC_FILENAME).read_text(encoding="utf-8"))
    except (ValidationError, UnicodeDecodeError) as exc:
        raise error(f"{directory}: cannot read {SPEC_FILENAME}: {exc}") from exc


def load_built_weights(model: nn.Module, directory: Path) -> nn.Module:
    """Load a saved model's weights into its rebuilt architecture; the model in eval mode."""
    load_weights(model, Path(directory) / WEIGHTS_FILENAME)
    return model.eval()
