"""A disk cache of decoded arrays, keyed by the SHA-256 of the file they were decoded from.

Decoding CIFAR-10's 60,000 JPEGs takes 10–30 s; loading the decoded uint8 arrays back from
``.npy`` files takes well under a second. Entries live in
``<cache dir>/<name>/<sha256 of the source>/<array>.npy``: a changed source file has another
digest, so it is decoded again (and the entries of older digests are removed). An entry is
written into a temporary sibling directory and renamed into place, so a reader never sees
a half-written entry, even when two runs fill the cache at once.

The cache directory is ``data.kwargs.cache_dir``, else ``$SPIRALKIT_CACHE_DIR``, else
``~/.cache/spiralkit``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

__all__ = ["CACHE_DIR_ENV", "cache_dir", "cached_arrays"]

CACHE_DIR_ENV = "SPIRALKIT_CACHE_DIR"


def cache_dir(configured: Path | None) -> Path:
    """``configured``, else ``$SPIRALKIT_CACHE_DIR``, else ``~/.cache/spiralkit``."""
    if configured is not None:
        return configured.expanduser()
    from_env = os.environ.get(CACHE_DIR_ENV, "").strip()
    return Path(from_env).expanduser() if from_env else Path.home() / ".cache" / "spiralkit"


def cached_arrays(
    directory: Path,
    *,
    name: str,
    digest: str,
    names: tuple[str, ...],
    build: Callable[[], Mapping[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """The arrays ``names`` of source ``name`` with SHA-256 ``digest``: from the cache, else built and stored.

    Args:
        directory: The cache directory (created when needed).
        name: The data set; its entries live in ``directory / name``.
        digest: Hex SHA-256 of the source the arrays are decoded from.
        names: The arrays an entry holds.
        build: Decodes the source; returns at least the arrays ``names``.

    Returns:
        The arrays by name. An entry that cannot be read is rebuilt; one that cannot be
        written (read-only or full disk) only costs a warning: the built arrays are returned.
    """
    entry = directory / name / digest
    try:
        return {key: np.load(entry / f"{key}.npy", allow_pickle=False) for key in names}
    except (OSError, ValueError):
        pass  # no entry, or a damaged one: build it again
    built = build()
    arrays = {key: np.asarray(built[key]) for key in names}
    try:
        _store(entry, arrays)
    except OSError as exc:
        warnings.warn(f"cannot cache decoded {name} in {directory}: {exc}", RuntimeWarning, stacklevel=2)
    return arrays


def _store(entry: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write an entry atomically and remove the entries of other digests."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=entry.parent))
    try:
        for key, array in arrays.items():
            np.save(staging / f"{key}.npy", array, allow_pickle=False)
        if entry.exists():  # a damaged entry, or another run just wrote the same one
            shutil.rmtree(entry, ignore_errors=True)
        os.replace(staging, entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for other in entry.parent.iterdir():
        if other != entry and not other.name.startswith(".partial-"):
            shutil.rmtree(other, ignore_errors=True)
