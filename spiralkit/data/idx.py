"""Reading MNIST-style idx files (plain or gzip) and checking them against SHA256SUMS.

An idx file is a big-endian header followed by raw unsigned bytes:

- images: magic 2051, then int32 ``n``, ``rows``, ``cols``; ``n * rows * cols`` pixels;
- labels: magic 2049, then int32 ``n``; ``n`` labels.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from spiralkit.errors import DataError

__all__ = [
    "IMAGES_MAGIC",
    "LABELS_MAGIC",
    "parse_idx_images",
    "parse_idx_labels",
    "read_checksums",
    "read_data_file",
    "verify_checksum",
]

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
CHECKSUMS_NAME = "SHA256SUMS"


def read_checksums(root: Path) -> dict[str, str]:
    """Read ``<root>/SHA256SUMS`` (``sha256sum`` format: ``<hex>  <relative path>``).

    Args:
        root: The data root directory.

    Returns:
        Lower-case hex digest by POSIX path relative to ``root``; empty when there is no
        SHA256SUMS file.

    Raises:
        DataError: A line is not ``<64 hex digits> <path>``.
    """
    sums_path = root / CHECKSUMS_NAME
    if not sums_path.is_file():
        return {}
    sums: dict[str, str] = {}
    for number, line in enumerate(sums_path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        digest, _, name = line.strip().partition(" ")
        # sha256sum writes "  name" in text mode and " *name" in binary mode.
        name = name.strip().removeprefix("*").removeprefix("./")
        if len(digest) != 64 or not name or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise DataError(
                f"{sums_path}, line {number}: expected '<sha256 hex>  <path>', got {line!r}"
            )
        sums[name] = digest.lower()
    return sums


def read_data_file(path: Path, *, root: Path, checksums: Mapping[str, str]) -> bytes:
    """Read a data file, verify it when SHA256SUMS lists it, and gunzip ``.gz`` files.

    Args:
        path: The file, somewhere under ``root``.
        root: The data root that SHA256SUMS paths are relative to.
        checksums: From `read_checksums`; files not listed there are not verified.

    Returns:
        The file's contents, decompressed when its name ends in ``.gz``.

    Raises:
        DataError: The file cannot be read, its SHA-256 differs from SHA256SUMS, or it is
            not valid gzip.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    verify_checksum(path, raw, root=root, checksums=checksums)
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a valid gzip file: {exc}") from exc


def verify_checksum(path: Path, raw: bytes, *, root: Path, checksums: Mapping[str, str]) -> str:
    """The SHA-256 of a file's bytes, checked against SHA256SUMS when it lists the file.

    Args:
        path: The file, somewhere under ``root`` (named in the message).
        raw: Its contents, as read.
        root: The data root that SHA256SUMS paths are relative to.
        checksums: From `read_checksums`.

    Returns:
        The lower-case hex SHA-256 of ``raw``.

    Raises:
        DataError: SHA256SUMS lists the file with another digest.
    """
    actual = hashlib.sha256(raw).hexdigest()
    try:
        relative = path.relative_to(root).as_posix()
    except ValueError:
        relative = None
    expected = checksums.get(relative) if relative is not None else None
    if expected is not None and actual != expected:
        raise DataError(
            f"{path}: SHA-256 mismatch with {root / CHECKSUMS_NAME} (expected {expected}, "
            f"got {actual}); the file is corrupt or was replaced"
        )
    return actual


def parse_idx_images(data: bytes, *, path: Path) -> np.ndarray:
    """Parse idx3 image bytes.

    Args:
        data: The (decompressed) file contents.
        path: The file, named in error messages.

    Returns:
        A read-only uint8 array of shape ``(n, rows, cols)``.

    Raises:
        DataError: Bad magic number, or the size is not ``16 + n * rows * cols`` bytes.
    """
    return _parse_idx(data, path=path, magic=IMAGES_MAGIC, kind="idx3 images", ndim=3)


def parse_idx_labels(data: bytes, *, path: Path) -> np.ndarray:
    """Parse idx1 label bytes.

    Args:
        data: The (decompressed) file contents.
        path: The file, named in error messages.

    Returns:
        A read-only uint8 array of shape ``(n,)``.

    Raises:
        DataError: Bad magic number, or the size is not ``8 + n`` bytes.
    """
    return _parse_idx(data, path=path, magic=LABELS_MAGIC, kind="idx1 labels", ndim=1)


def _parse_idx(data: bytes, *, path: Path, magic: int, kind: str, ndim: int) -> np.ndarray:
    header = 4 * (1 + ndim)
    if len(data) < header:
        raise DataError(
            f"{path}: truncated: {len(data)} bytes is shorter than the {header}-byte {kind} header"
        )
    found, *dims = struct.unpack(f">{1 + ndim}I", data[:header])
    if found != magic:
        raise DataError(f"{path}: bad magic number {found}, expected {magic} ({kind})")
    expected = header + math.prod(dims)
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "has trailing bytes"
        shape = " x ".join(str(d) for d in dims)
        raise DataError(
            f"{path}: {problem}: {len(data)} bytes, expected {expected} "
            f"({header}-byte header + {shape} values)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
