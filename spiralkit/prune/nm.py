"""Semi-structured N:M sparsity: at most ``n`` non-zeros in every ``m`` consecutive input weights.

A weight is viewed as the matrix ``(out, in)`` its layer multiplies (a Conv2d weight as
``(out, in·kh·kw)``); each row is cut into groups of ``m`` consecutive columns, and a group
keeps its ``n`` best-scored weights (2:4 is what sparse tensor cores run). An N:M mask is an
ordinary keep-mask (`spiralkit.prune.unstructured`), so it is enforced through recovery like
any other: gradients of pruned weights are zeroed and the mask is re-applied after every
optimizer step.

**Storage** (`pack_masks` / `unpack_masks`, the run directory's ``masks.packed.safetensors``):
one bit per weight, ``np.packbits`` in row-major order (big-endian bit order, the last byte
zero-padded), one ``uint8`` tensor per mask, and the safetensors metadata
``{"format": "spiralkit.masks/1", "shapes": {name: shape}, "pattern": "n:m" or ""}``. A 2:4
mask costs 1 bit per weight (an index encoding, ``log2 C(4,2)`` bits per group, would save
a quarter of that). Masks are reloaded exactly, and an N:M pattern recorded in the file is
checked on load.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from spiralkit.errors import PruneError, StorageError
from spiralkit.export.weights import atomic_write_bytes

__all__ = ["NM", "check_nm", "nm_keep_mask", "pack_masks", "unpack_masks", "save_masks", "load_masks"]

MASKS_FORMAT = "spiralkit.masks/1"


class NM(BaseModel):
    """An N:M pattern: at most ``n`` of every ``m`` consecutive input weights are non-zero.

    Attributes:
        n: weights kept per group.
        m: group length (along the input dimension).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    n: int = Field(gt=0)
    m: int = Field(gt=1)

    @model_validator(mode="after")
    def _n_below_m(self) -> NM:
        if self.n >= self.m:
            raise ValueError(f"an N:M pattern keeps fewer weights than its group holds: n={self.n} must be < m={self.m}")
        return self

    @property
    def sparsity(self) -> float:
        """The fraction pruned, ``1 − n/m``."""
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def _groups(matrix: Tensor, pattern: NM, name: str) -> Tensor:
    rows, cols = matrix.shape
    if cols % pattern.m:
        raise PruneError(f"layer {name!r}: its {cols} input columns are not a multiple of m={pattern.m}, "
                         f"so the {pattern} pattern does not fit; exclude the layer")
    return matrix.reshape(rows, cols // pattern.m, pattern.m)


def nm_keep_mask(scores: Tensor, pattern: NM, *, name: str = "weight") -> Tensor:
    """Keep-mask of the ``n`` highest scores in each group of ``m`` consecutive columns.

    Args:
        scores: ``(out, in)`` scores (``-inf`` marks weights that must go); ties keep the
            earlier column.
        pattern: the N:M pattern.
        name: the layer, for error messages.

    Raises:
        PruneError: the column count is not a multiple of ``m`` (names the layer).
    """
    groups = _groups(scores, pattern, name)
    best = torch.argsort(groups, dim=-1, descending=True, stable=True)[..., : pattern.n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, best, True)
    return keep.reshape(scores.shape)


def check_nm(mask: Tensor, pattern: NM, *, name: str = "weight") -> None:
    """Raise `PruneError` naming ``name`` unless every group of ``m`` columns keeps at most ``n``."""
    matrix = mask.reshape(mask.shape[0], -1)
    counts = _groups(matrix, pattern, name).sum(-1)
    if bool((counts > pattern.n).any()):
        row, group = (int(i) for i in torch.nonzero(counts > pattern.n)[0])
        raise PruneError(f"mask of {name!r} breaks the {pattern} pattern: row {row}, columns "
                         f"{group * pattern.m}..{group * pattern.m + pattern.m - 1} keep {int(counts[row, group])}")


def pack_masks(masks: Mapping[str, Tensor], *, pattern: NM | None = None) -> bytes:
    """Keep-masks as safetensors bytes, one bit per entry (the format is in the module docstring)."""
    packed = {name: torch.from_numpy(np.packbits(m.detach().cpu().bool().numpy().reshape(-1)))
              for name, m in masks.items()}
    metadata = {"format": MASKS_FORMAT, "shapes": json.dumps({n: list(m.shape) for n, m in masks.items()}),
                "pattern": str(pattern) if pattern is not None else ""}
    return save_safetensors(packed, metadata=metadata)


def unpack_masks(data: bytes, *, source: str = "<masks>") -> dict[str, Tensor]:
    """Exact inverse of `pack_masks`; an N:M pattern recorded in the data is checked.

    Raises:
        StorageError: ``data`` is not a spiralkit mask file, or a mask does not match its shape.
        PruneError: a mask breaks the recorded N:M pattern.
    """
    try:
        tensors = load_safetensors(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
    except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
        raise StorageError(f"{source} is not a safetensors mask file: {exc}") from None
    if metadata.get("format") != MASKS_FORMAT:
        raise StorageError(f"{source} is not a spiralkit mask file (format {metadata.get('format')!r}, "
                           f"expected {MASKS_FORMAT!r})")
    shapes = json.loads(metadata["shapes"])
    pattern = None
    if metadata.get("pattern"):
        n, m = (int(v) for v in metadata["pattern"].split(":"))
        pattern = NM(n=n, m=m)
    masks: dict[str, Tensor] = {}
    for name, shape in shapes.items():
        if name not in tensors:
            raise StorageError(f"{source}: mask {name!r} is listed but not stored")
        count = int(np.prod(shape)) if shape else 1
        bits = np.unpackbits(tensors[name].numpy())
        if bits.size < count or bits.size - count >= 8:
            raise StorageError(f"{source}: mask {name!r} holds {tensors[name].numel()} bytes, not the {count} bits "
                               f"of shape {tuple(shape)}")
        masks[name] = torch.from_numpy(bits[:count].astype(bool)).reshape(shape)
        if pattern is not None:
            check_nm(masks[name], pattern, name=name)
    return masks


def save_masks(path: Path, masks: Mapping[str, Tensor], *, pattern: NM | None = None) -> int:
    """Write `pack_masks` atomically to ``path``; returns the bytes written."""
    data = pack_masks(masks, pattern=pattern)
    atomic_write_bytes(Path(path), data)
    return len(data)


def load_masks(path: Path) -> dict[str, Tensor]:
    """Read masks written by `save_masks`.

    Raises:
        StorageError: the file is missing or not a spiralkit mask file (names it).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read masks {path}: {exc.strerror or exc}") from None
    return unpack_masks(data, source=str(path))
