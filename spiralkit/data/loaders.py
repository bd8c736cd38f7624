"""Batch loaders: the `Loader` protocol and a fast in-memory `TensorLoader`.

A loader is anything that yields ``(x, y)`` tensor batches and knows how many batches it
yields (``len``); ``torch.utils.data.DataLoader`` qualifies. `TensorLoader` is the one the
built-in data sets use: whole batches are sliced out of two tensors at once instead of
collating examples one by one, which keeps an MNIST epoch cheap on a small CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from spiralkit.errors import DataError

__all__ = ["Loader", "TensorLoader"]


@runtime_checkable
class Loader(Protocol):
    """An iterable of ``(x, y)`` tensor batches whose ``len`` is the number of batches."""

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...

    def __len__(self) -> int: ...


class TensorLoader:
    """Yields ``(x[idx], y[idx])`` batches from two in-memory tensors.

    Shuffling is reproducible: the order of epoch ``e`` is
    ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))``. The epoch is
    whatever `set_epoch` last set, or an internal counter that advances after each complete
    pass, so a resumed run that calls ``set_epoch(e)`` sees exactly the batches the original
    run saw in epoch ``e``.

    Args:
        x: Inputs, one example per row of dimension 0.
        y: Targets, as many rows as ``x``.
        batch_size: Examples per batch (> 0); the last batch may be smaller.
        shuffle: Draw a fresh permutation every epoch; otherwise keep the stored order.
        seed: Base seed of the per-epoch permutations.
        drop_last: Skip the last batch when it is smaller than ``batch_size``.
        lengths: Optional length of every example (e.g. tokens of a sentence). When
            shuffling, each epoch's permutation is cut into pools of ``50·batch_size``
            examples, each pool is sorted by length and cut into batches, and the batches
            are shuffled: batches hold examples of similar length, so a model that trims
            padding per batch does far less work. Still a permutation, still reproducible.

    Attributes:
        augmented: Always False: an example is the same tensor in every epoch (see
            `spiralkit.data.imageloader.ImageLoader`, whose training batches may be augmented).

    Raises:
        DataError: ``x`` and ``y`` differ in length, are empty, ``batch_size`` is not a
            positive int, or ``drop_last`` would leave no batch at all.
    """

    augmented = False

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        lengths: Tensor | None = None,
    ) -> None:
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise DataError(
                f"TensorLoader needs two tensors, got {type(x).__name__} and {type(y).__name__}"
            )
        if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
            raise DataError(
                f"TensorLoader: x and y must have the same number of rows, "
                f"got x {tuple(x.shape)} and y {tuple(y.shape)}"
            )
        if x.shape[0] == 0:
            raise DataError("TensorLoader: no examples (x and y are empty)")
        if lengths is not None and tuple(lengths.shape) != (x.shape[0],):
            raise DataError(
                f"TensorLoader: lengths must have one entry per example ({x.shape[0]}), got shape {tuple(lengths.shape)}"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise DataError(f"TensorLoader: batch_size must be a positive int, got {batch_size!r}")
        self._x = x
        self._y = y
        self._batch_size = batch_size
        self._shuffle = shuffle
        self._seed = seed
        self._drop_last = drop_last
        self._lengths = lengths
        self._rank = 0
        self._world_size = 1
        self._epoch = 0
        self._check_not_empty()

    @property
    def num_examples(self) -> int:
        """Examples this loader draws from per epoch (a shard's share when sharded)."""
        return self._x.shape[0] // self._world_size

    @property
    def batch_size(self) -> int:
        """Examples per batch."""
        return self._batch_size

    @property
    def epoch(self) -> int:
        """The epoch whose permutation the next pass uses."""
        return self._epoch

    def __len__(self) -> int:
        """Number of batches per epoch."""
        full, rest = divmod(self.num_examples, self._batch_size)
        return full if self._drop_last or rest == 0 else full + 1

    def __repr__(self) -> str:
        shard = f", shard={self._rank}/{self._world_size}" if self._world_size > 1 else ""
        return (
            f"TensorLoader(num_examples={self.num_examples}, batch_size={self._batch_size}, "
            f"shuffle={self._shuffle}, seed={self._seed}, epoch={self._epoch}{shard})"
        )

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch (and hence the permutation) of the next pass.

        Args:
            epoch: Epoch number, >= 0.

        Raises:
            DataError: ``epoch`` is not a non-negative int.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise DataError(f"TensorLoader.set_epoch: epoch must be an int >= 0, got {epoch!r}")
        self._epoch = epoch

    def shard(self, rank: int, world_size: int, *, batch_size: int | None = None) -> TensorLoader:
        """A loader over this process's part of every epoch, for data-parallel training.

        Every shard draws the same permutation of epoch ``e``, truncates it to
        ``world_size * (n // world_size)`` examples and takes every ``world_size``-th one
        starting at ``rank``. Shards are therefore disjoint and equally long; up to
        ``world_size - 1`` examples per epoch are left out (different ones each epoch when
        shuffled, the same trailing ones when not). This is what ``DistributedSampler``
        (with ``drop_last``) does for a dataset, for in-memory tensors.

        With ``batch_size = B / world_size`` the shards' batches ``k`` together are exactly
        batch ``k`` of this loader (of ``B``) over the kept examples: data-parallel training
        on the shards takes the steps one process takes on the whole loader.

        Args:
            rank: This process's index, ``0 <= rank < world_size``.
            world_size: Number of processes sharing the data.
            batch_size: Examples per batch of the shard (default: this loader's).

        Returns:
            A new loader over the same tensors, starting at this loader's epoch.

        Raises:
            DataError: Bad ``rank``/``world_size``, this loader is already a shard, or a
                shard would be empty.
        """
        for label, value in (("rank", rank), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise DataError(f"TensorLoader.shard: {label} must be an int, got {value!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(
                f"TensorLoader.shard: need 0 <= rank < world_size, got rank={rank}, "
                f"world_size={world_size}"
            )
        if self._world_size != 1:
            raise DataError("TensorLoader.shard: this loader is already a shard")
        if self._x.shape[0] < world_size:
            raise DataError(
                f"TensorLoader.shard: {self._x.shape[0]} examples cannot be split "
                f"over {world_size} processes"
            )
        part = TensorLoader(
            self._x,
            self._y,
            batch_size=self._batch_size if batch_size is None else batch_size,
            shuffle=self._shuffle,
            seed=self._seed,
            drop_last=self._drop_last,
            lengths=self._lengths,
        )
        part._rank, part._world_size, part._epoch = rank, world_size, self._epoch
        part._check_not_empty()
        return part

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # The order is fixed when iteration starts, so set_epoch during a pass has no effect
        # on that pass.
        return self._batches(self._order(self._epoch))

    def _order(self, epoch: int) -> Tensor | None:
        """Example indices of one epoch for this loader, or None for the stored order."""
        n = self._x.shape[0]
        order: Tensor | None = None
        if self._shuffle:
            generator = torch.Generator().manual_seed(self._seed + epoch)
            order = torch.randperm(n, generator=generator)
            if self._lengths is not None:
                order = group_by_length(order, self._lengths, batch_size=self._batch_size, generator=generator)
        if self._world_size > 1:
            everything = order if order is not None else torch.arange(n)
            kept = everything[: self.num_examples * self._world_size]
            order = kept[self._rank :: self._world_size]
        return order

    def _batches(self, order: Tensor | None) -> Iterator[tuple[Tensor, Tensor]]:
        size = self._batch_size
        stop = self.num_examples
        if self._drop_last:
            stop -= stop % size
        for start in range(0, stop, size):
            if order is None:
                # Plain slices are views: no copy for unshuffled evaluation loaders.
                yield self._x[start : start + size], self._y[start : start + size]
            else:
                idx = order[start : start + size]
                yield self._x[idx], self._y[idx]
        self._epoch += 1

    def _check_not_empty(self) -> None:
        if len(self) == 0:
            raise DataError(
                f"TensorLoader: drop_last with batch_size={self._batch_size} leaves no batch "
                f"of {self.num_examples} examples"
            )


POOL_BATCHES = 50


def group_by_length(order: Tensor, lengths: Tensor, *, batch_size: int, generator: torch.Generator) -> Tensor:
    """Reorder a permutation so that batches hold examples of similar length.

    ``order`` is cut into pools of ``POOL_BATCHES·batch_size``; each pool is sorted by
    ``lengths`` (longest first) and cut into batches; the full batches are shuffled with
    ``generator`` and the last, partial one stays last. The result is a permutation of
    ``order``.
    """
    window = POOL_BATCHES * batch_size
    pools = [chunk[torch.argsort(lengths[chunk], descending=True, stable=True)] for chunk in order.split(window)]
    batches = list(torch.cat(pools).split(batch_size))
    tail = batches.pop() if batches[-1].numel() < batch_size else None
    shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return torch.cat(shuffled + ([tail] if tail is not None else []))
