"""A recipe's fingerprint: everything in it that changes a run's results, so a run directory
is only ever continued by the recipe that started it.

The fingerprint is the recipe flattened to dotted keys (``prune.0.target_sparsity``), less
the keys that change how fast a run goes or where it reads data from, but not what it
computes (`IGNORED`), plus the SHA-256 of every checkpoint file the recipe reads. It is saved
as ``fingerprint.json`` in the run directory; resuming with a recipe whose fingerprint
differs is refused with the differing keys named.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spiralkit.errors import SpiralError
from spiralkit.export import atomic_write_text
from spiralkit.spiral.recipe import Recipe, load_recipe
from spiralkit.spiral.rundir import RECIPE

__all__ = ["FINGERPRINT", "IGNORED", "Fingerprint", "check_fingerprint", "fingerprint", "read_fingerprint", "run_fingerprint"]

FINGERPRINT = "fingerprint.json"
IGNORED = ("name", "threads", "measure", "data.root", "data.kwargs.cache_dir")
"""Keys (and everything below them) that do not change a run's results."""

_SCHEMA = "spiralkit.fingerprint/1"
_CHUNK = 1 << 20


class Fingerprint(BaseModel):
    """What a run's results depend on.

    Attributes:
        keys: the recipe's values by dotted key, without the `IGNORED` keys.
        files: SHA-256 of each file the recipe reads, by the key naming it.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    schema_: str = Field(default=_SCHEMA, alias="schema")
    keys: dict[str, Any]
    files: dict[str, str] = Field(default_factory=dict)

    def differences(self, other: Fingerprint) -> list[str]:
        """The dotted keys whose values differ (a file's key when its contents differ).

        A key naming a file that both fingerprints hashed is compared by the file's contents,
        not its path: a comparison or run directory moved elsewhere still resumes.
        """
        hashed = self.files.keys() & other.files.keys()
        keys = sorted(k for k in self.keys.keys() | other.keys.keys()
                      if k not in hashed and self.keys.get(k) != other.keys.get(k))
        files = sorted(f"{k} (file contents)" for k in self.files.keys() | other.files.keys()
                       if self.files.get(k) != other.files.get(k) and k not in keys)
        return keys + files


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        items: list[tuple[str, Any]] = list(value.items())
    elif isinstance(value, list):
        items = [(str(index), item) for index, item in enumerate(value)]
    else:
        return {prefix: value}
    flat: dict[str, Any] = {} if items else {prefix: value}
    for key, item in items:
        flat |= _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    return flat


def _ignored(key: str) -> bool:
    return any(key == ignored or key.startswith(ignored + ".") for ignored in IGNORED)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise SpiralError(f"cannot read {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def fingerprint(recipe: Recipe) -> Fingerprint:
    """The fingerprint of ``recipe`` (reads and hashes the checkpoint files it names)."""
    keys = {k: v for k, v in _flatten(recipe.model_dump(mode="json")).items() if not _ignored(k)}
    checkpoint = recipe.model.checkpoint_path()
    files = {"model.checkpoint": _sha256(checkpoint)} if checkpoint is not None else {}
    return Fingerprint(keys=keys, files=files)


def read_fingerprint(run_dir: Path) -> Fingerprint | None:
    """The fingerprint saved in ``run_dir``, or None when the run predates fingerprints.

    Raises:
        SpiralError: the file exists but is not a fingerprint.
    """
    path = run_dir / FINGERPRINT
    if not path.exists():
        return None
    try:
        return Fingerprint.model_validate_json(path.read_text(encoding="utf-8"))
    except (ValidationError, UnicodeDecodeError, OSError) as exc:
        raise SpiralError(f"{path} is not a recipe fingerprint: {str(exc).splitlines()[0]}") from None


def run_fingerprint(run_dir: Path) -> Fingerprint | None:
    """What ``run_dir``'s results depend on: its saved fingerprint, else (a run that predates
    fingerprints) its recipe.yaml's; None when it holds neither.

    Raises:
        SpiralError: a file is there but unreadable.
    """
    saved = read_fingerprint(run_dir)
    if saved is not None or not (run_dir / RECIPE).exists():
        return saved
    return fingerprint(load_recipe(run_dir / RECIPE))


def write_fingerprint(run_dir: Path, print_: Fingerprint) -> None:
    """Save ``print_`` as the run directory's fingerprint (atomically)."""
    atomic_write_text(run_dir / FINGERPRINT, json.dumps(print_.model_dump(by_alias=True), indent=2) + "\n")


def check_fingerprint(run_dir: Path, recipe: Recipe, *, saved: Fingerprint) -> None:
    """Refuse ``recipe`` for the run in ``run_dir`` when its fingerprint differs from ``saved``.

    Raises:
        SpiralError: the differing keys, named.
    """
    differing = saved.differences(fingerprint(recipe))
    if differing:
        shown = ", ".join(differing[:12]) + (f" and {len(differing) - 12} more" if len(differing) > 12 else "")
        raise SpiralError(
            f"{run_dir} holds a run of a different recipe: {shown} differ(s). Use the recipe that started "
            "it (its copy is the directory's recipe.yaml), or choose another --out"
        )
