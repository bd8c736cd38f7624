"""What data to load (`DataSpec`) and what loading returns (`DataSplits`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from spiralkit.data.loaders import Loader

__all__ = ["DataSpec", "DataSplits"]


class DataSpec(BaseModel):
    """The ``data`` section of a recipe.

    Attributes:
        name: A built-in data set (``spiralkit.data.DATA_SOURCES``: ``mnist-sample``, ``mnist``,
            ``fashion-mnist``, ``digits``, ``sst2``, ``cifar10-jpeg``, ``imagefolder``,
            ``text-tsv``, ``tinystories``) or ``"package.module:function"``.
        root: Directory holding on-disk data sets (``<root>/mnist/...``); when None the
            ``SPIRALKIT_DATA_DIR`` environment variable is used. ``mnist``, ``fashion-mnist``,
            ``sst2`` and ``cifar10-jpeg`` read it.
        batch_size: Training batch size.
        eval_batch_size: Batch size of the validation and test loaders.
        val_fraction: Share of the training split held out as validation, which drives
            keep/rollback decisions (the test split is only reported).
        limit_train: Keep only this many training examples (after carving validation);
            a larger value keeps them all. For quick runs.
        kwargs: Options of a built-in data set (``mnist``, ``fashion-mnist``, ``sst2``,
            ``cifar10-jpeg``, ``imagefolder``, ``text-tsv``: see the README), or keyword
            arguments of a ``module:function`` source; an int ``num_classes`` among those is
            also reported as `DataSplits.num_classes`.

    Built-in data sets use every field; a ``module:function`` source builds its own
    loaders, so only ``name`` and ``kwargs`` apply to it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    root: Path | None = None
    batch_size: int = Field(default=128, gt=0)
    eval_batch_size: int = Field(default=1000, gt=0)
    val_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    limit_train: int | None = Field(default=None, gt=0)
    kwargs: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class DataSplits:
    """The loaders of one data set and what a model needs to know about it.

    Attributes:
        name: The `DataSpec.name` it was loaded from.
        train: Training batches, reshuffled every epoch.
        val: Validation batches carved from the training data; used for decisions.
        test: Held-out test batches when the data set has them; the reported metric.
        input_shape: Shape of one example, e.g. ``(1, 28, 28)``.
        num_classes: Number of classes, or None when unknown.
        class_names: Name of each class index when the data set names them (``cifar10-jpeg``,
            ``imagefolder``, ``text-tsv``), else None.
    """

    name: str
    train: Loader
    val: Loader
    test: Loader | None
    input_shape: tuple[int, ...]
    num_classes: int | None
    class_names: tuple[str, ...] | None = None
