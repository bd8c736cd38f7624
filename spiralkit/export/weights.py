"""Weights on disk: dense and sparse safetensors files, written atomically.

Two formats, both plain safetensors files that never unpickle Python objects:

* **dense** (`save_weights` / `load_state`): one safetensors entry per tensor, keyed by
  its state-dict name, readable by any safetensors tool.
* **sparse** (`save_sparse` / `load_sparse`): per tensor, whichever is smaller of the dense
  tensor or a packed bitmask (``np.packbits`` of the non-zero positions, ``uint8``) plus the
  non-zero values in the original dtype. Entries are keyed ``"{i}"`` (dense) or
  ``"{i}.mask"`` / ``"{i}.values"`` (bitmask); the ``"spiralkit.tensors"`` metadata entry
  (JSON) maps them back to names, shapes and dtypes, so no tensor name can collide with a key.

"Non-zero" in the sparse format means ``x != 0``: the round trip is bit-exact for every
stored element (NaN and infinities included), and ``-0.0`` — which pruning by a mask
multiplication leaves behind — is a zero like any other and loads back as ``+0.0``.

Tied tensors (two names for one tensor, e.g. shared embeddings) are stored once; the other
names are recorded in the ``"spiralkit.aliases"`` metadata entry and restored on load.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import safetensors
import torch
from safetensors.torch import save as _safetensors_bytes
from torch import Tensor, nn

from spiralkit.errors import ModelError, StorageError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "load_sparse",
    "load_state",
    "save_sparse",
    "save_weights",
]

StateLike = nn.Module | Mapping[str, Tensor]

_FORMAT_KEY = "spiralkit.format"
_DENSE_FORMAT = "dense-v1"
_SPARSE_FORMAT = "sparse-v1"
_TENSORS_KEY = "spiralkit.tensors"
_ALIASES_KEY = "spiralkit.aliases"
# Each extra safetensors entry costs a header record (name, dtype, shape, offsets); a bitmask
# entry only pays off when it saves more than this.
_ENTRY_OVERHEAD_BYTES = 96


# --------------------------------------------------------------------------- atomic writes


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never half.

    The bytes go to a temporary file in the same directory, which is fsynced and then moved
    over ``path`` with ``os.replace`` (atomic on POSIX and Windows). The temporary file is
    removed if anything fails. The new file gets the usual ``0o666 & ~umask`` permissions.

    Args:
        path: Destination file; its directory must exist.
        data: The complete new content.

    Raises:
        StorageError: the file cannot be written (disk full, read-only, permissions); the
            old file, if any, is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # disk full, read-only file system, permissions: say which file
        _remove_quietly(tmp)
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_directory(path.parent)


def _remove_quietly(path: Path) -> None:
    """Remove a temporary file if it is there; a file system that refuses is not a second error."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically (see `atomic_write_bytes`).

    Args:
        path: Destination file; its directory must exist.
        text: The complete new content; newlines are written as given.
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable where the OS allows opening directories."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- dense format


def save_weights(model_or_state: StateLike, path: Path) -> int:
    """Save a model's state dict (or a plain state dict) as a dense safetensors file.

    Args:
        model_or_state: A module (its ``state_dict()`` is saved) or a name → tensor mapping.
        path: Destination file, written atomically.

    Returns:
        The number of bytes written.
    """
    unique, aliases = _unique_tensors(_as_state(model_or_state))
    metadata = {_FORMAT_KEY: _DENSE_FORMAT, _ALIASES_KEY: json.dumps(aliases)}
    data = _safetensors_bytes(unique, metadata=metadata)
    atomic_write_bytes(Path(path), data)
    return len(data)


def load_state(path: Path) -> dict[str, Tensor]:
    """Load a state dict from a safetensors file on the CPU.

    Reads files written by `save_weights`, files written by `save_sparse` (detected from the
    metadata and decoded with `load_sparse`) and plain safetensors files from other tools.

    Args:
        path: The safetensors file.

    Returns:
        Name → tensor, with tied names restored (they refer to the same tensor).

    Raises:
        ModelError: The file is missing or is not a readable safetensors file.
    """
    tensors, metadata = _read_safetensors(Path(path))
    if metadata.get(_FORMAT_KEY) == _SPARSE_FORMAT:
        return _decode_sparse(tensors, metadata, Path(path))
    return _restore_aliases(tensors, metadata, Path(path))


# --------------------------------------------------------------------------- sparse format


def save_sparse(model_or_state: StateLike, path: Path) -> int:
    """Save a state dict in the compact sparse encoding (see the module docstring).

    Each tensor is stored dense or as bitmask + values, whichever is smaller:
    dense costs ``n * itemsize`` bytes, bitmask costs ``ceil(n / 8) + nnz * itemsize``
    bytes plus one extra header entry.

    Args:
        model_or_state: A module (its ``state_dict()`` is saved) or a name → tensor mapping.
        path: Destination file, written atomically.

    Returns:
        The number of bytes written.
    """
    unique, aliases = _unique_tensors(_as_state(model_or_state))
    entries: list[dict[str, object]] = []
    stored: dict[str, Tensor] = {}
    for index, (name, tensor) in enumerate(unique.items()):
        entries.append(_encode_entry(index, name, tensor, stored))
    metadata = {
        _FORMAT_KEY: _SPARSE_FORMAT,
        _TENSORS_KEY: json.dumps(entries, separators=(",", ":")),
        _ALIASES_KEY: json.dumps(aliases, separators=(",", ":")),
    }
    data = _safetensors_bytes(stored, metadata=metadata)
    atomic_write_bytes(Path(path), data)
    return len(data)


def load_sparse(path: Path) -> dict[str, Tensor]:
    """Load a file written by `save_sparse`: the exact inverse, bit for bit.

    Args:
        path: The sparse safetensors file.

    Returns:
        Name → tensor with the original shapes and dtypes, tied names restored.

    Raises:
        ModelError: The file is missing, unreadable or not in the sparse format.
    """
    path = Path(path)
    tensors, metadata = _read_safetensors(path)
    if metadata.get(_FORMAT_KEY) != _SPARSE_FORMAT:
        raise ModelError(
            f"{path} is not a spiralkit sparse weights file (no '{_FORMAT_KEY}: {_SPARSE_FORMAT}' metadata)"
        )
    return _decode_sparse(tensors, metadata, path)


def _encode_entry(index: int, name: str, tensor: Tensor, stored: dict[str, Tensor]) -> dict[str, object]:
    """Add one tensor's storage entries to ``stored``; return its metadata record."""
    flat = tensor.reshape(-1)
    nonzero = _nonzero_bits(flat)
    count = int(nonzero.sum())
    itemsize = tensor.element_size()
    bitmask_bytes = math.ceil(flat.numel() / 8) + count * itemsize + _ENTRY_OVERHEAD_BYTES
    if bitmask_bytes >= flat.numel() * itemsize:
        stored[str(index)] = tensor
        return {"name": name, "enc": "dense"}
    stored[f"{index}.mask"] = torch.from_numpy(np.packbits(nonzero.numpy()))
    stored[f"{index}.values"] = flat[nonzero].contiguous()
    dtype = str(tensor.dtype).removeprefix("torch.")
    return {"name": name, "enc": "bitmask", "dtype": dtype, "shape": list(tensor.shape)}


def _nonzero_bits(flat: Tensor) -> Tensor:
    """Which elements of a 1-D tensor are stored: those that are not zero (NaN included).

    ``-0.0`` counts as zero and loads back as ``+0.0``: the two are equal in every
    computation, and pruning by multiplying with a mask leaves ``-0.0`` wherever the
    pruned weight was negative.
    """
    return flat != 0


def _decode_sparse(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> dict[str, Tensor]:
    """Rebuild the state dict from sparse-format entries."""
    try:
        entries = json.loads(metadata[_TENSORS_KEY])
        state = {entry["name"]: _decode_entry(index, entry, tensors) for index, entry in enumerate(entries)}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelError(f"{path} has a corrupt sparse-format table: {exc!r}") from exc
    return _restore_aliases(state, metadata, path)


def _decode_entry(index: int, entry: dict[str, object], tensors: dict[str, Tensor]) -> Tensor:
    """Rebuild one tensor from its metadata record and stored entries."""
    if entry["enc"] == "dense":
        return tensors[str(index)]
    if entry["enc"] != "bitmask":
        raise ValueError(f"unknown encoding {entry['enc']!r}")
    shape = [int(size) for size in entry["shape"]]  # type: ignore[union-attr]
    numel = math.prod(shape)
    packed = tensors[f"{index}.mask"].numpy()
    mask = torch.from_numpy(np.unpackbits(packed, count=numel).astype(bool))
    flat = torch.zeros(numel, dtype=_dtype(str(entry["dtype"])))
    flat[mask] = tensors[f"{index}.values"]
    return flat.reshape(shape)


def _dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (e.g. ``"float32"``)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


# --------------------------------------------------------------------------- shared helpers


def _as_state(model_or_state: StateLike) -> Mapping[str, Tensor]:
    """A module's state dict, or the mapping itself."""
    if isinstance(model_or_state, nn.Module):
        return model_or_state.state_dict()
    return model_or_state


def _unique_tensors(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Split a state dict into tensors to store (CPU, contiguous) and alias → stored name.

    Two names are aliases when they view exactly the same memory the same way (tied
    weights). Tensors that merely overlap in memory are copied, because safetensors refuses
    to store shared memory twice.
    """
    unique: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple[object, ...], str] = {}
    storages: set[tuple[object, ...]] = set()
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, Tensor):
            raise ModelError(f"state entry {name!r} is a {type(tensor).__name__}, expected a str → Tensor mapping")
        tensor = tensor.detach()
        if tensor.numel() > 0:
            storage = (tensor.device, tensor.untyped_storage().data_ptr())
            view = (*storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
            if view in views:
                aliases[name] = views[view]
                continue
            views[view] = name
            tensor = tensor.clone() if storage in storages else tensor
            storages.add(storage)
        unique[name] = tensor.cpu().contiguous()
    return unique, aliases


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors (on the CPU) and the metadata of a safetensors file."""
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"cannot read safetensors file {path}: {exc}") from exc
    return tensors, metadata


def _restore_aliases(state: dict[str, Tensor], metadata: dict[str, str], path: Path) -> dict[str, Tensor]:
    """Add tied names back, pointing at their stored tensor."""
    try:
        aliases: dict[str, str] = json.loads(metadata.get(_ALIASES_KEY, "{}"))
        for alias, target in aliases.items():
            state[alias] = state[target]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelError(f"{path} has a corrupt '{_ALIASES_KEY}' metadata entry: {exc!r}") from exc
    return state
