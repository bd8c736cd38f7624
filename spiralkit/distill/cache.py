"""Teacher caching: a frozen teacher's outputs computed once per example, reused afterwards.

The teacher of a distillation never changes, and without augmentation neither do its
inputs, so every epoch after the first (and every later round of the spiral) would run it
on the same examples again. `TeacherCache` keys each example by a hash of its bytes — which
works with any loader and any shuffle — looks a batch up, runs the teacher only on the rows
it has not seen, and stores what it gets.

Storage is memory-bounded: rows go into fixed-size segments held in RAM up to
``budget_mb``, then into memory-mapped files in a temporary directory (removed by `close`,
or when the cache is garbage-collected) up to ``disk_budget_mb``; beyond that new rows are
computed and not stored.

Augmented inputs are safe: a stored output is reused only for a row whose bytes are
identical, so a randomly cropped or flipped image is a new row and gets the teacher's output
for exactly that input (a 128-bit digest; a collision is not a practical concern). They make
the cache useless, though — every row is new and costs a hash and storage — so switch it off
(``Distill.cache_teacher = false``) when the training loader says ``augmented`` (see
`spiralkit.data.imageloader.ImageLoader`).

Rows are computed on a subset of their batch, so the teacher must treat examples
independently (eval mode: BatchNorm with running statistics, no dropout) — true of a frozen
teacher.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CacheStats", "CachedModel", "TeacherCache", "row_keys"]

Compute = Callable[[Tensor], Mapping[str, Tensor]]


def row_keys(x: Tensor) -> list[bytes]:
    """A 128-bit BLAKE2b digest of each row's bytes (dimension 0 indexes the rows)."""
    rows = x.detach().to("cpu").contiguous().reshape(x.shape[0], -1)
    raw = rows.view(torch.uint8).numpy() if rows.dtype != torch.uint8 else rows.numpy()
    return [hashlib.blake2b(raw[i], digest_size=16).digest() for i in range(raw.shape[0])]


@dataclass(frozen=True)
class CacheStats:
    """What a cache has done: rows served and computed, and where the stored rows live."""

    hits: int
    misses: int
    stored_rows: int
    ram_bytes: int
    disk_bytes: int

    def __str__(self) -> str:
        return (f"teacher cache: {self.hits} hits, {self.misses} computed, {self.stored_rows} stored "
                f"({self.ram_bytes / 2**20:.1f} MiB RAM, {self.disk_bytes / 2**20:.1f} MiB disk)")


@dataclass(frozen=True)
class _Column:
    """Layout of one named output: per-row shape and dtype."""

    row_shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def row_bytes(self) -> int:
        return math.prod(self.row_shape) * torch.empty((), dtype=self.dtype).element_size()


class TeacherCache:
    """Teacher outputs by example: look a batch up, compute only the rows not seen before.

    Args:
        budget_mb: stored rows kept in RAM up to this many MiB.
        disk_budget_mb: further rows spilled to memory-mapped files up to this many MiB.
        segment_mb: size of one storage segment (the unit of allocation), in MiB.

    Usage::

        with TeacherCache(budget_mb=256) as cache:
            outputs = cache.fetch(x, lambda rows: {"logits": teacher(rows)})
    """

    def __init__(self, *, budget_mb: float = 512.0, disk_budget_mb: float = 4096.0, segment_mb: float = 16.0) -> None:
        if budget_mb < 0 or disk_budget_mb < 0 or segment_mb <= 0:
            raise ValueError(f"cache budgets must be >= 0 and segment_mb > 0, got {budget_mb}, {disk_budget_mb}, {segment_mb}")
        self._budget = int(budget_mb * 2**20)
        self._disk_budget = int(disk_budget_mb * 2**20)
        self._segment_bytes = max(1, int(segment_mb * 2**20))
        self._slots: dict[bytes, int] = {}
        self._input: tuple[tuple[int, ...], torch.dtype] | None = None
        self._columns: dict[str, _Column] = {}
        self._segments: list[dict[str, Tensor]] = []
        self._segment_rows = 0
        self._ram = self._disk = self._hits = self._misses = 0
        self._full = False
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    # ------------------------------------------------------------------ public

    @property
    def stats(self) -> CacheStats:
        """Hits, misses and storage so far."""
        return CacheStats(hits=self._hits, misses=self._misses, stored_rows=len(self._slots),
                          ram_bytes=self._ram, disk_bytes=self._disk)

    def fetch(self, x: Tensor, compute: Compute) -> dict[str, Tensor]:
        """The outputs for batch ``x``: stored rows looked up, the others from ``compute``.

        Args:
            x: the batch of inputs, one example per row of dimension 0.
            compute: runs the teacher on some rows of ``x``; returns named tensors with one
                row per input row (logits, tapped features). Always the same names.

        Returns:
            Named tensors for the whole batch, in ``x``'s row order, on ``x``'s device.
        """
        if not isinstance(x, Tensor) or x.ndim == 0 or x.shape[0] == 0:
            return dict(compute(x))
        signature = (tuple(x.shape[1:]), x.dtype)
        if self._input is None:
            self._input = signature
        elif signature != self._input:  # e.g. another padded length: not comparable rows
            return dict(compute(x))
        keys = row_keys(x)
        known = [self._slots.get(k) for k in keys]
        fresh: dict[bytes, int] = {}  # key -> row of the computed subset (duplicates computed once)
        for index, (key, slot) in enumerate(zip(keys, known, strict=True)):
            if slot is None and key not in fresh:
                fresh[key] = index
        computed: dict[str, Tensor] = {}
        if fresh:
            rows = torch.tensor(list(fresh.values()), device=x.device)
            computed = {name: value.detach().to("cpu") for name, value in compute(x[rows]).items()}
            self._misses += len(fresh)
            if not self._store(list(fresh), computed):
                return self._bypass(x, compute)
        self._hits += sum(slot is not None for slot in known)
        return self._assemble(keys, fresh, computed, device=x.device)

    def close(self) -> None:
        """Forget every stored row and delete the spill files."""
        self._slots.clear()
        self._segments.clear()
        self._ram = self._disk = 0
        self._full = False
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> TeacherCache:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ storage

    def _bypass(self, x: Tensor, compute: Compute) -> dict[str, Tensor]:
        """Outputs whose layout differs from the stored one: computed for the whole batch, not stored."""
        return {name: value.detach() for name, value in compute(x).items()}

    def _layout_matches(self, computed: Mapping[str, Tensor]) -> bool:
        if not self._columns:
            self._columns = {n: _Column(tuple(v.shape[1:]), v.dtype) for n, v in computed.items()}
            row_bytes = sum(c.row_bytes for c in self._columns.values())
            self._segment_rows = max(1, self._segment_bytes // max(1, row_bytes))
            return True
        return set(computed) == set(self._columns) and all(
            tuple(v.shape[1:]) == self._columns[n].row_shape and v.dtype == self._columns[n].dtype
            for n, v in computed.items()
        )

    def _store(self, keys: list[bytes], computed: Mapping[str, Tensor]) -> bool:
        """Store the computed rows under ``keys``; False when their layout is not the cache's.

        Outputs that are not one row per example (batch not first) cannot be cached.
        """
        if any(value.ndim == 0 or value.shape[0] != len(keys) for value in computed.values()):
            return False
        if not self._layout_matches(computed):
            return False
        start, count, done = len(self._slots), len(keys), 0
        while done < count:  # new rows take consecutive slots: copy them a segment's slice at a time
            segment, row = divmod(start + done, self._segment_rows)
            if segment == len(self._segments) and not self._grow():
                break
            take = min(count - done, self._segment_rows - row)
            for name, value in computed.items():
                self._segments[segment][name][row:row + take] = value[done:done + take]
            done += take
        self._slots.update((key, start + offset) for offset, key in enumerate(keys[:done]))
        return True

    def _grow(self) -> bool:
        """Add a segment in RAM, else on disk; False when both budgets are spent."""
        if self._full:
            return False
        size = self._segment_rows * sum(c.row_bytes for c in self._columns.values())
        if self._ram + size <= self._budget:
            self._segments.append({n: torch.empty((self._segment_rows, *c.row_shape), dtype=c.dtype)
                                   for n, c in self._columns.items()})
            self._ram += size
            return True
        if self._disk + size <= self._disk_budget:
            self._segments.append(self._disk_segment())
            self._disk += size
            return True
        self._full = True
        return False

    def _disk_segment(self) -> dict[str, Tensor]:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="spiralkit-teacher-cache-")
        folder = Path(self._tmp.name)
        segment = {}
        for index, (name, column) in enumerate(self._columns.items()):
            path = folder / f"segment{len(self._segments)}-{index}.bin"
            numel = self._segment_rows * math.prod(column.row_shape)
            flat = torch.from_file(str(path), shared=True, size=numel, dtype=column.dtype)
            segment[name] = flat.view(self._segment_rows, *column.row_shape)
        return segment

    def _gather(self, name: str, slots: Tensor) -> Tensor:
        column = self._columns[name]
        out = torch.empty((slots.shape[0], *column.row_shape), dtype=column.dtype)
        segments, rows = slots // self._segment_rows, slots % self._segment_rows
        for segment in segments.unique().tolist():
            chosen = segments == segment
            out[chosen] = self._segments[segment][name][rows[chosen]]
        return out

    def _assemble(self, keys: list[bytes], fresh: Mapping[bytes, int],
                  computed: Mapping[str, Tensor], *, device: Any) -> dict[str, Tensor]:
        """Batch outputs in row order: stored rows gathered, the rest from ``computed``."""
        stored = [i for i, k in enumerate(keys) if k in self._slots]
        slots = torch.tensor([self._slots[keys[i]] for i in stored], dtype=torch.long)
        order = {key: position for position, key in enumerate(fresh)}
        unstored = [i for i, k in enumerate(keys) if k not in self._slots]
        sources = torch.tensor([order[keys[i]] for i in unstored], dtype=torch.long)
        outputs = {}
        for name, column in self._columns.items():
            out = torch.empty((len(keys), *column.row_shape), dtype=column.dtype)
            if stored:
                out[torch.tensor(stored)] = self._gather(name, slots)
            if unstored:
                out[torch.tensor(unstored)] = computed[name][sources]
            outputs[name] = out.to(device)
        return outputs


class CachedModel(nn.Module):
    """A frozen model whose outputs go through a `TeacherCache`: each distinct row is computed once.

    For a model that is run again and again on the same examples, such as the reference of
    the fidelity task, which every evaluation of every round compares with. The model must
    treat rows independently (eval mode), as the cache computes subsets of a batch.

    Args:
        model: The frozen model; it is a submodule, so ``eval()`` reaches it.
        cache: Where its outputs are kept; closing it is the caller's business.
    """

    def __init__(self, model: nn.Module, cache: TeacherCache) -> None:
        super().__init__()
        self.model = model
        self.cache = cache

    def forward(self, x: Tensor) -> Tensor:
        """``model(x)``, with the rows seen before looked up."""
        return self.cache.fetch(x, lambda rows: {"output": self.model(rows)})["output"]
