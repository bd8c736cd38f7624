"""`ImageLoader`: uint8 images normalised per batch, with optional training augmentation.

Images stay uint8 in memory (CIFAR-10's 50,000 training images take 150 MiB instead of
600 MiB as float32); each batch is converted to float, optionally augmented, and
normalised on the way out. The order of batches, `set_epoch` and `shard` are those of the
`TensorLoader` inside.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from spiralkit.data.loaders import TensorLoader

__all__ = ["PAD", "ImageLoader", "augment_batch"]

PAD = 4
"""Zero padding (pixels on each side) of the random crop, as in He et al. 2016's CIFAR training."""


class ImageLoader:
    """Yields normalised float32 ``(b, C, H, W)`` batches of uint8 images.

    A batch is ``((x / 255 - mean) / std, y)`` per channel. With ``augment``, each image is
    first padded by ``pad`` zero pixels on every side, cropped back to ``H`` x ``W`` at a
    random offset and, with ``flip``, flipped left-right with probability 1/2 (`augment_batch`). The random
    draws of epoch ``e`` come from a generator seeded with ``(seed, e, rank)``, so a pass
    over epoch ``e`` gives the same batches every time, like the shuffled order.

    Args:
        images: uint8 ``(n, C, H, W)``.
        labels: int64 ``(n,)``.
        batch_size: Examples per batch.
        shuffle: Reshuffle every epoch (see `TensorLoader`).
        seed: Base seed of the order and of the augmentation.
        mean: Per-channel mean of the pixels scaled to [0, 1].
        std: Per-channel standard deviation of the pixels scaled to [0, 1].
        augment: Random crop and flip each training batch.
        pad: Zero padding of the random crop (pixels on each side): the largest shift.
        flip: Also flip left-right (off for images whose mirror is another class, e.g. digits).

    Attributes:
        augmented: Whether batches are augmented, i.e. an example's input differs from
            epoch to epoch. A teacher cache gains nothing on such batches (it keys rows by
            their content, so it stays correct, but every row is new).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        pad: int = PAD,
        flip: bool = True,
    ) -> None:
        self._inner = TensorLoader(images, labels, batch_size=batch_size, shuffle=shuffle, seed=seed)
        self._pad = pad
        self._flip = flip
        self._seed = seed
        self._rank = 0
        self._mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augmented = augment

    @property
    def num_examples(self) -> int:
        """Examples this loader draws from per epoch."""
        return self._inner.num_examples

    @property
    def batch_size(self) -> int:
        """Examples per batch."""
        return self._inner.batch_size

    @property
    def epoch(self) -> int:
        """The epoch the next pass uses."""
        return self._inner.epoch

    def __len__(self) -> int:
        """Number of batches per epoch."""
        return len(self._inner)

    def __repr__(self) -> str:
        return f"ImageLoader({self._inner!r}, augmented={self.augmented})"

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch (order and augmentation) of the next pass; see `TensorLoader.set_epoch`."""
        self._inner.set_epoch(epoch)

    def shard(self, rank: int, world_size: int, *, batch_size: int | None = None) -> ImageLoader:
        """This process's part of every epoch; see `TensorLoader.shard`. Ranks augment differently."""
        part = copy.copy(self)
        part._inner = self._inner.shard(rank, world_size, batch_size=batch_size)
        part._rank = rank
        return part

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        generator = None
        if self.augmented:
            state = np.random.SeedSequence([self._seed, self._inner.epoch, self._rank]).generate_state(1)
            generator = torch.Generator().manual_seed(int(state[0]))
        for x, y in self._inner:
            if generator is not None:
                x = augment_batch(x, generator=generator, pad=self._pad, flip=self._flip)
            yield (x.float().div_(255.0) - self._mean).div_(self._std), y


def augment_batch(x: Tensor, *, generator: torch.Generator, pad: int = PAD, flip: bool = True) -> Tensor:
    """Random crop with ``pad`` zero pixels of padding, then (with ``flip``) a random left-right flip.

    Args:
        x: ``(b, C, H, W)`` images (any dtype; padding is value 0).
        generator: Source of the offsets (uniform in ``0..2·pad``) and flips (probability 1/2).
        pad: Padding on each side, i.e. the largest shift in each direction.
        flip: Draw and apply the flips; without them the offsets are the only random draws.

    Returns:
        A new ``(b, C, H, W)`` tensor.
    """
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator)
    rows = (offsets[:, 0:1] + torch.arange(h)).view(b, 1, h, 1)
    cols = (offsets[:, 1:2] + torch.arange(w)).view(b, 1, 1, w)
    cropped = padded[torch.arange(b).view(b, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]
    if not flip:
        return cropped
    flips = torch.rand(b, generator=generator) < 0.5
    return torch.where(flips.view(b, 1, 1, 1), cropped.flip(-1), cropped)
