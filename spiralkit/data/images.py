"""Image classification data in torchvision's folder layout, from a directory or a tar archive.

The layout is ``train/<class>/<image>`` and ``test/<class>/<image>`` (``.jpg``, ``.jpeg``,
``.png``); class ``i`` is the ``i``-th class folder name in sorted order, as torchvision's
``ImageFolder`` numbers them. Every image is decoded once with Pillow into RGB and, when
asked, resized (shorter side) and centre-cropped; the result is one uint8 ``(n, H, W, 3)``
array per split, which `spiralkit.data.imageloader.ImageLoader` normalises per batch.

The same code reads a directory (``imagefolder``) and a tar archive (``cifar10-jpeg``):
a *store* lists its files by relative POSIX name and returns a file's bytes.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat

from spiralkit.errors import DataError

__all__ = [
    "CIFAR10_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "Cifar10JpegOptions",
    "FolderOptions",
    "ImageOptions",
    "SPLITS",
    "DecodedImages",
    "Layout",
    "decode_layout",
    "decode_folder",
    "decode_tar",
]

SPLITS = ("train", "test")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""The usual normalisation of pretrained image networks (ImageNet statistics); the
pretrained CIFAR-10 ResNets in the offline data were trained with it."""

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

Layout = dict[str, dict[str, list[str]]]
"""``{split: {class: [relative image names]}}``, e.g. ``{"train": {"cat": ["train/cat/0001.jpg"]}}``."""


class ImageOptions(BaseModel):
    """The ``data.kwargs`` every image data set takes.

    Attributes:
        mean: Per-channel (RGB) mean of the pixels scaled to [0, 1], subtracted per batch.
        std: Per-channel standard deviation, divided by per batch.
        augment: Augment training batches (random crop with 4 pixels of zero padding and a
            left-right flip, reproducible per seed and epoch); never validation or test.
        train_subset: Train on this many of the training images (after validation is
            carved out): a class-stratified subset drawn with a fixed seed, the same in every
            run, for CPU-sized epochs. A larger number keeps them all.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = IMAGENET_STD
    augment: bool = False
    train_subset: int | None = Field(default=None, gt=0)


class FolderOptions(ImageOptions):
    """The ``data.kwargs`` of ``imagefolder``: `ImageOptions` and where and how to read images.

    Attributes:
        root: The folder holding ``train/<class>/`` and ``test/<class>/``.
        resize: Resize every image so its shorter side has this many pixels (bilinear).
        crop: Then keep the central ``crop`` x ``crop`` square. Without resize or crop every
            image must already have the same size.
    """

    root: Path
    resize: int | None = Field(default=None, gt=0)
    crop: int | None = Field(default=None, gt=0)


class Cifar10JpegOptions(ImageOptions):
    """The ``data.kwargs`` of ``cifar10-jpeg``: `ImageOptions` and the decoded-array cache.

    Attributes:
        cache_dir: Where decoded arrays are kept; else ``$SPIRALKIT_CACHE_DIR``, else
            ``~/.cache/spiralkit`` (see `spiralkit.data.arraycache`).
    """

    cache_dir: Path | None = None


@dataclass(frozen=True)
class DecodedImages:
    """The decoded images of both splits.

    Attributes:
        train_x: uint8 ``(n, H, W, 3)`` training images.
        train_y: int64 ``(n,)`` class indices.
        test_x: uint8 ``(m, H, W, 3)`` test images.
        test_y: int64 ``(m,)`` class indices.
        class_names: Class folder names; class ``i`` is ``class_names[i]``.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: tuple[str, ...]


def decode_folder(root: Path, *, resize: int | None, crop: int | None) -> DecodedImages:
    """Decode every image under ``root/{train,test}/<class>/``.

    Args:
        root: The folder.
        resize: Resize each image so its shorter side is this many pixels (bilinear).
        crop: Then cut the central ``crop`` x ``crop`` square.

    Raises:
        DataError: ``root`` or a split folder is missing, or the layout or an image is bad
            (see `decode_layout`).
    """
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist (expected {root}/train/<class>/ and {root}/test/<class>/)")
    layout: Layout = {}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"image folder {folder} does not exist (expected {folder}/<class>/<image>)")
        layout[split] = {
            group.name: sorted(f"{split}/{group.name}/{f.name}" for f in group.iterdir() if _is_image(f.name))
            for group in folder.iterdir()
            if group.is_dir()
        }

    def read(name: str) -> bytes:
        try:
            return (root / name).read_bytes()
        except OSError as exc:
            raise DataError(f"{root / name}: cannot read: {exc}") from None

    return decode_layout(layout, read, where=f"{root}/", resize=resize, crop=crop)


def decode_tar(archive: Path, *, size: int | None = None) -> DecodedImages:
    """Decode every image of a ``.tar[.gz]`` archive in the folder layout.

    The archive is read once as a stream (a gzip stream cannot seek back cheaply): every
    image's bytes are kept in memory, then decoded in class order.

    Args:
        archive: The archive; its members are ``[./]{train,test}/<class>/<image>``.
        size: When set, every image must be ``size`` x ``size`` (checked, not resized).

    Raises:
        DataError: The archive cannot be read, or its layout or an image is bad.
    """
    folders: list[str] = []
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                name = _relative(member.name)
                handle = tar.extractfile(member) if member.isfile() and _is_image(name) else None
                if handle is not None:
                    files[name] = handle.read()
                elif member.isdir():
                    folders.append(name)
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise DataError(f"{archive}: cannot read the archive: {exc}") from None
    layout = _tar_layout(folders, files, archive=archive)
    return decode_layout(layout, files.__getitem__, where=f"{archive}:", resize=None, crop=None, size=size)


def decode_layout(
    layout: Layout,
    read: Callable[[str], bytes],
    *,
    where: str,
    resize: int | None,
    crop: int | None,
    size: int | None = None,
) -> DecodedImages:
    """Check a layout and decode its images.

    Args:
        layout: From `folder_layout` or an archive's listing.
        read: The bytes of an image, by its relative name.
        where: Prefix naming the store in messages (``"/data/pets/"``, ``"cifar.tar.gz:"``).
        resize: Resize each image so its shorter side is this many pixels (bilinear).
        crop: Then cut the central ``crop`` x ``crop`` square.
        size: When set, every image must be ``size`` x ``size`` after the above.

    Raises:
        DataError: A split has no class folders, a class folder has no images, train and
            test have different classes, an image is unreadable or of another size than the
            first one (the message names the file).
    """
    _check_layout(layout, where=where)
    class_names = tuple(sorted(layout["train"]))
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    shape: tuple[int, ...] | None = (size, size, 3) if size is not None else None
    for split in SPLITS:
        names = [name for group in class_names for name in layout[split][group]]
        labels = np.concatenate([np.full(len(layout[split][g]), i, dtype=np.int64) for i, g in enumerate(class_names)])
        images: np.ndarray | None = None
        for index, name in enumerate(names):
            pixels = _decode(read(name), name=f"{where}{name}", resize=resize, crop=crop)
            if shape is None:
                shape = pixels.shape
            if pixels.shape != shape:
                raise DataError(
                    f"{where}{name}: image is {pixels.shape[1]}x{pixels.shape[0]} but the others are "
                    f"{shape[1]}x{shape[0]}; set data.kwargs resize/crop to give every image one size"
                )
            if images is None:
                images = np.empty((len(names), *shape), dtype=np.uint8)
            images[index] = pixels
        assert images is not None  # _check_layout: every class has images
        arrays[split] = (images, labels)
    return DecodedImages(*arrays["train"], *arrays["test"], class_names=class_names)


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _relative(name: str) -> str:
    return PurePosixPath(name.removeprefix("./")).as_posix()


def _tar_layout(folders: list[str], files: Mapping[str, bytes], *, archive: Path) -> Layout:
    layout: Layout = {}
    for name in [*folders, *files]:
        parts = PurePosixPath(name).parts
        is_file = name in files
        if len(parts) < 2 or parts[0] not in SPLITS or (is_file and len(parts) != 3):
            continue
        classes = layout.setdefault(parts[0], {}).setdefault(parts[1], [])
        if is_file:
            classes.append(name)
    for split in SPLITS:
        if split not in layout:
            raise DataError(f"{archive}: no {split}/ folder in the archive (expected {split}/<class>/<image>)")
        for names in layout[split].values():
            names.sort()
    return layout


def _check_layout(layout: Layout, *, where: str) -> None:
    for split in SPLITS:
        if not layout[split]:
            raise DataError(f"{where}{split}/: no class folders (expected {split}/<class>/<image>)")
        empty = [f"{where}{split}/{group}/" for group, names in sorted(layout[split].items()) if not names]
        if empty:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            raise DataError(f"class folder(s) without images ({suffixes}): {', '.join(empty)}")
    train, test = set(layout["train"]), set(layout["test"])
    if train != test:
        only = [f"only in train/: {', '.join(sorted(train - test))}" if train - test else "",
                f"only in test/: {', '.join(sorted(test - train))}" if test - train else ""]
        raise DataError(f"{where}: train/ and test/ have different class folders ({'; '.join(o for o in only if o)})")


def _decode(data: bytes, *, name: str, resize: int | None, crop: int | None) -> np.ndarray:
    """One image's RGB pixels, uint8 ``(H, W, 3)``, resized and cropped as asked."""
    # Imported here: Pillow comes with torchvision and only image data sets need it.
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = opened.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(f"{name}: cannot decode the image: {exc}") from None
    if resize is not None:
        scale = resize / min(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BILINEAR)
    if crop is not None:
        if min(image.size) < crop:
            raise DataError(f"{name}: image is {image.width}x{image.height}, smaller than crop {crop}")
        left, top = (image.width - crop) // 2, (image.height - crop) // 2
        image = image.crop((left, top, left + crop, top + crop))
    return np.asarray(image, dtype=np.uint8)
