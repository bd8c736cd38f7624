"""Image data sets: imagefolder, cifar10-jpeg (decoded once, cached), ImageLoader and augmentation."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spiralkit.data import DataSpec, TensorLoader, load_data
from spiralkit.data import arraycache, sources
from spiralkit.data.imageloader import PAD, ImageLoader, augment_batch
from spiralkit.data.images import CIFAR10_CLASSES, IMAGENET_MEAN, IMAGENET_STD
from spiralkit.errors import DataError


def _value(label: int, index: int) -> int:
    """The red value of image ``index`` of class ``label``: both can be read back from it."""
    return 20 * label + index


def _write_folder(root: Path, counts: dict[str, dict[str, int]], *, size: tuple[int, int] = (8, 8),
                  suffix: str = ".png") -> Path:
    """``root/<split>/<class>/NNNN<suffix>``: solid images, red = `_value`, green = 7, blue = split."""
    for split, classes in counts.items():
        for label, (name, n) in enumerate(sorted(classes.items())):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(n):
                colour = (_value(label, index), 7, 0 if split == "train" else 255)
                Image.new("RGB", size, colour).save(folder / f"{index:04d}{suffix}")
    return root


def _counts(train: int, test: int, classes: tuple[str, ...] = ("cat", "dog")) -> dict[str, dict[str, int]]:
    return {"train": dict.fromkeys(classes, train), "test": dict.fromkeys(classes, test)}


def _folder_spec(root: Path, **kwargs: object) -> DataSpec:
    return DataSpec(name="imagefolder", batch_size=4, eval_batch_size=100, val_fraction=0.2,
                    kwargs={"root": str(root), **kwargs})


def _all(loader: object) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)  # type: ignore[call-overload]
    return torch.cat(xs), torch.cat(ys)


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """Normalised images back to 0..255 values (default ImageNet mean/std)."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return torch.round((x * std + mean) * 255)


# ------------------------------------------------------------------------- imagefolder


def test_imagefolder_shapes_labels_classes_and_normalisation(tmp_path: Path) -> None:
    _write_folder(tmp_path, _counts(train=5, test=2))
    data = load_data(_folder_spec(tmp_path))
    assert data.input_shape == (3, 8, 8) and data.num_classes == 2
    assert data.class_names == ("cat", "dog")
    assert (data.train.num_examples, data.val.num_examples, data.test.num_examples) == (8, 2, 4)
    x, y = _all(data.test)
    assert x.dtype == torch.float32 and x.shape == (4, 3, 8, 8)
    assert y.tolist() == [0, 0, 1, 1]
    pixels = _pixels(x)
    assert pixels[:, 0, 0, 0].tolist() == [_value(0, 0), _value(0, 1), _value(1, 0), _value(1, 1)]
    assert (pixels[:, 1] == 7).all() and (pixels[:, 2] == 255).all()
    # Validation comes from the training images (blue 0), one per class; pairs survive.
    val_x, val_y = _all(data.val)
    assert sorted(val_y.tolist()) == [0, 1] and (_pixels(val_x)[:, 2] == 0).all()
    train_x, train_y = _all(data.train)
    assert torch.equal(_pixels(train_x)[:, 0, 0, 0].long() // 20, train_y)


def test_imagefolder_mean_std_jpeg_resize_and_crop(tmp_path: Path) -> None:
    _write_folder(tmp_path, _counts(train=5, test=1), size=(16, 10), suffix=".jpg")
    data = load_data(_folder_spec(tmp_path, resize=5, crop=4, mean=[0, 0, 0], std=[1, 1, 1]))
    assert data.input_shape == (3, 4, 4)
    x, _ = _all(data.test)
    assert x.shape == (2, 3, 4, 4)
    assert torch.allclose(x[:, 1], torch.full_like(x[:, 1], 7 / 255), atol=4 / 255)  # JPEG is lossy


def test_imagefolder_train_subset_is_stratified_and_fixed(tmp_path: Path) -> None:
    _write_folder(tmp_path, _counts(train=10, test=1))
    first = load_data(_folder_spec(tmp_path, train_subset=6))
    again = load_data(_folder_spec(tmp_path, train_subset=6).model_copy(update={"batch_size": 6}), seed=5)
    x, y = _all(first.train)
    assert first.train.num_examples == 6 and torch.bincount(y).tolist() == [3, 3]
    assert sorted(_pixels(x)[:, 0, 0, 0].tolist()) == sorted(_pixels(_all(again.train)[0])[:, 0, 0, 0].tolist())
    assert load_data(_folder_spec(tmp_path, train_subset=99)).train.num_examples == 16  # all of them


def _garbage_image(root: Path) -> str:
    bad = root / "train" / "dog" / "0001.png"
    bad.write_bytes(b"not an image")
    return str(bad)


def _odd_size(root: Path) -> str:
    odd = root / "test" / "dog" / "0000.png"
    Image.new("RGB", (9, 8)).save(odd)
    return str(odd)


@pytest.mark.parametrize(
    ("damage", "kwargs", "message"),
    [
        (lambda root: str(root / "nowhere"), {"root_suffix": "nowhere"}, "image folder .*nowhere does not exist"),
        (lambda root: str(root / "test"), {"remove": "test"}, r"image folder .*test does not exist \(expected .*<class>"),
        (lambda root: str(root / "train" / "bird"), {"mkdir": "train/bird"}, "class folder.* without images"),
        (_garbage_image, {}, "cannot decode the image"),
        (_odd_size, {}, "image is 9x8 but the others are 8x8; set data.kwargs resize/crop"),
        (lambda root: "only in test/: emu", {"mkdir_image": "test/emu"}, "train/ and test/ have different class folders"),
        (lambda root: "crop 9", {"crop": 9}, "smaller than crop 9"),
        (lambda root: "accepted keys: mean, std, augment, train_subset, root", {"size": 3}, "bad data.kwargs .*size"),
    ],
)
def test_imagefolder_errors_name_the_folder_or_file(tmp_path: Path, damage, kwargs: dict, message: str) -> None:
    _write_folder(tmp_path, _counts(train=5, test=1))
    root = tmp_path / kwargs.pop("root_suffix", "")
    if "remove" in kwargs:
        for file in (tmp_path / kwargs["remove"]).rglob("*.png"):
            file.unlink()
        for folder in sorted((tmp_path / kwargs.pop("remove")).rglob("*"), reverse=True) + [tmp_path / "test"]:
            folder.rmdir()
    if "mkdir" in kwargs:
        (tmp_path / kwargs.pop("mkdir")).mkdir()
    if "mkdir_image" in kwargs:
        folder = tmp_path / kwargs.pop("mkdir_image")
        folder.mkdir()
        Image.new("RGB", (8, 8)).save(folder / "0.png")
    named = damage(tmp_path)
    with pytest.raises(DataError, match=message) as info:
        load_data(_folder_spec(root, **kwargs))
    assert named in str(info.value)


# ---------------------------------------------------------------------- ImageLoader


def _image_loader(*, augment: bool, seed: int = 0, n: int = 12) -> ImageLoader:
    images = torch.arange(n * 3 * 6 * 6, dtype=torch.int64).remainder(251).to(torch.uint8).view(n, 3, 6, 6)
    return ImageLoader(images, torch.arange(n), batch_size=5, shuffle=True, seed=seed, augment=augment,
                       mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def test_augmentation_is_reproducible_per_seed_and_epoch() -> None:
    loader = _image_loader(augment=True)
    assert loader.augmented and len(loader) == 3
    first = list(loader)
    loader.set_epoch(0)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, loader, strict=True))
    second = _all(loader)  # epoch 1: another order and other crops
    again = _image_loader(augment=True)
    again.set_epoch(1)
    assert torch.equal(_all(again)[0], second[0])
    other_seed = _image_loader(augment=True, seed=1)
    other_seed.set_epoch(1)
    assert not torch.equal(_all(other_seed)[0], second[0])


def test_augmentation_is_a_padded_crop_and_flip_and_off_without_augment() -> None:
    plain = _image_loader(augment=False)
    images = {int(y): x for x, y in zip(*_all(plain), strict=True)}
    plain.set_epoch(0)
    assert not plain.augmented
    x, y = _all(_image_loader(augment=True))
    shifted = 0
    for image, label in zip(x, y, strict=True):
        padded = torch.nn.functional.pad(images[int(label)], (PAD,) * 4)
        crops = [c for dy in range(2 * PAD + 1) for dx in range(2 * PAD + 1)
                 for c in (padded[:, dy:dy + 6, dx:dx + 6], padded[:, dy:dy + 6, dx:dx + 6].flip(-1))]
        assert any(torch.equal(image, crop) for crop in crops)
        shifted += not torch.equal(image, images[int(label)])
    assert shifted > 6  # most images moved or flipped


def test_augment_batch_without_flip_only_shifts() -> None:
    x = torch.arange(4 * 5 * 5, dtype=torch.int64).view(4, 1, 5, 5).remainder(250).add(1).to(torch.uint8)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(augment_batch(x, generator=generator, pad=0, flip=False), x)  # no shift, never flipped
    assert not torch.equal(augment_batch(x.repeat(8, 1, 1, 1), generator=generator, pad=0, flip=True), x.repeat(8, 1, 1, 1))
    shifted = augment_batch(x, generator=generator, pad=1, flip=False)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    assert all(any(torch.equal(shifted[i], padded[i, :, dy:dy + 5, dx:dx + 5]) for dy in range(3) for dx in range(3))
               for i in range(4))


def test_augment_batch_keeps_dtype_and_shape() -> None:
    x = torch.full((3, 2, 5, 5), 9, dtype=torch.uint8)
    out = augment_batch(x, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == x.shape and set(out.unique().tolist()) <= {0, 9}


def test_shards_augment_differently_and_keep_the_flag() -> None:
    loader = _image_loader(augment=True)
    parts = [loader.shard(rank, 2) for rank in range(2)]
    assert all(part.augmented and part.num_examples == 6 for part in parts)
    labels = torch.cat([_all(part)[1] for part in parts])
    assert sorted(labels.tolist()) == list(range(12))


def test_augmentation_only_on_training_batches(tmp_path: Path) -> None:
    _write_folder(tmp_path, _counts(train=5, test=1))
    data = load_data(_folder_spec(tmp_path, augment=True))
    assert data.train.augmented and not data.val.augmented and not data.test.augmented  # type: ignore[attr-defined]
    assert not TensorLoader(torch.zeros(2, 1), torch.zeros(2), batch_size=1, shuffle=False).augmented
    x, _ = _all(data.test)
    assert (_pixels(x)[:, 1] == 7).all()  # no zero padding moved in


# ----------------------------------------------------------------- cifar10-jpeg (synthetic)


def _write_cifar(root: Path, *, train: int = 3, test: int = 1, shade: int = 0,
                 classes: tuple[str, ...] = CIFAR10_CLASSES) -> Path:
    """``root/cifar10-jpeg/cifar10-jpg.tar.gz`` with 32x32 JPEGs, members named ``./train/...``."""
    folder = _write_folder(root / "unpacked", _counts(train, test, classes), size=(32, 32), suffix=".jpg")
    if shade:
        Image.new("RGB", (32, 32), (shade, shade, shade)).save(folder / "test" / classes[0] / "0000.jpg")
    archive = root / "cifar10-jpeg" / "cifar10-jpg.tar.gz"
    archive.parent.mkdir(exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=".")
    return archive


def _cifar_spec(root: Path, cache: Path, **kwargs: object) -> DataSpec:
    return DataSpec(name="cifar10-jpeg", root=root, batch_size=8, val_fraction=0.1,
                    kwargs={"cache_dir": str(cache), **kwargs})


class _Decodes:
    """Counts calls of the archive decoder, or refuses them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, allow: bool = True) -> None:
        self.calls = 0
        real = sources.decode_tar

        def decode(*args: object, **kwargs: object) -> object:
            if not allow:
                raise AssertionError("decoded although the cache holds the arrays")
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(sources, "decode_tar", decode)


def test_cifar10_jpeg_shapes_classes_and_cache_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _write_cifar(tmp_path)
    cache = tmp_path / "cache"
    decodes = _Decodes(monkeypatch)
    data = load_data(_cifar_spec(tmp_path, cache))
    assert decodes.calls == 1
    assert data.input_shape == (3, 32, 32) and data.num_classes == 10 and data.class_names == CIFAR10_CLASSES
    assert (data.train.num_examples, data.val.num_examples, data.test.num_examples) == (27, 3, 10)
    test_x, test_y = _all(data.test)
    assert test_y.tolist() == list(range(10))
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert sorted(p.name for p in (cache / "cifar10-jpeg" / digest).iterdir()) == [
        "test_x.npy", "test_y.npy", "train_x.npy", "train_y.npy"]
    _Decodes(monkeypatch, allow=False)  # the second load must not decode
    cached = load_data(_cifar_spec(tmp_path, cache))
    assert torch.equal(_all(cached.test)[0], test_x)


def test_cifar10_jpeg_changed_archive_is_decoded_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_cifar(tmp_path)
    cache = tmp_path / "cache"
    first = _all(load_data(_cifar_spec(tmp_path, cache)).test)[0]
    (tmp_path / "unpacked").rename(tmp_path / "old")
    _write_cifar(tmp_path, shade=200)
    decodes = _Decodes(monkeypatch)
    second = _all(load_data(_cifar_spec(tmp_path, cache)).test)[0]
    assert decodes.calls == 1 and not torch.equal(first, second)
    assert len(list((cache / "cifar10-jpeg").iterdir())) == 1  # the stale entry is gone


def test_cifar10_jpeg_cache_dir_from_environment_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPIRALKIT_CACHE_DIR", str(tmp_path / "env"))
    assert arraycache.cache_dir(None) == tmp_path / "env"
    assert arraycache.cache_dir(Path("~/x")) == Path.home() / "x"
    monkeypatch.delenv("SPIRALKIT_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert arraycache.cache_dir(None) == tmp_path / ".cache" / "spiralkit"
    _write_cifar(tmp_path, train=1)
    monkeypatch.setenv("SPIRALKIT_CACHE_DIR", str(tmp_path / "env"))
    load_data(DataSpec(name="cifar10-jpeg", root=tmp_path, val_fraction=0.5))
    assert len(list((tmp_path / "env" / "cifar10-jpeg").iterdir())) == 1


def test_cifar10_jpeg_damaged_cache_is_rebuilt_and_unwritable_cache_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = _write_cifar(tmp_path, train=1)
    cache = tmp_path / "cache"
    load_data(_cifar_spec(tmp_path, cache, augment=True))
    entry = cache / "cifar10-jpeg" / hashlib.sha256(archive.read_bytes()).hexdigest()
    (entry / "train_x.npy").write_bytes(b"\x93NUMPY broken")
    decodes = _Decodes(monkeypatch)
    assert load_data(_cifar_spec(tmp_path, cache, augment=True)).train.num_examples == 9
    assert decodes.calls == 1 and np.load(entry / "train_x.npy").shape == (10, 32, 32, 3)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.warns(RuntimeWarning, match="cannot cache decoded cifar10-jpeg in .*a-file"):
        data = load_data(_cifar_spec(tmp_path, blocker))
    assert data.test.num_examples == 10


def test_cifar10_jpeg_missing_archive_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="CIFAR-10 \\(JPEG\\) archive not found") as info:
        load_data(_cifar_spec(tmp_path, tmp_path / "cache"))
    assert str(tmp_path / "cifar10-jpeg" / "cifar10-jpg.tar.gz") in str(info.value)
    assert "contains cifar10-jpeg/" in str(info.value)


def test_cifar10_jpeg_checksum_mismatch_names_the_archive(tmp_path: Path) -> None:
    archive = _write_cifar(tmp_path, train=1)
    (tmp_path / "SHA256SUMS").write_text(f"{'0' * 64}  cifar10-jpeg/cifar10-jpg.tar.gz\n")
    with pytest.raises(DataError, match="SHA-256 mismatch") as info:
        load_data(_cifar_spec(tmp_path, tmp_path / "cache"))
    assert str(archive) in str(info.value)


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda root: _write_cifar(root, train=1, classes=("cat", "dog")),
         "class folders cat, dog; expected airplane, automobile"),
        (lambda root: _write_cifar(root, train=1).write_bytes(b"not a tar"), "cannot read the archive"),
    ],
)
def test_cifar10_jpeg_bad_archive_names_it(tmp_path: Path, write, message: str) -> None:
    write(tmp_path)
    with pytest.raises(DataError, match=message) as info:
        load_data(_cifar_spec(tmp_path, tmp_path / "cache"))
    assert str(tmp_path / "cifar10-jpeg" / "cifar10-jpg.tar.gz") in str(info.value)


def test_archive_without_a_test_folder(tmp_path: Path) -> None:
    folder = _write_folder(tmp_path / "unpacked", {"train": dict.fromkeys(CIFAR10_CLASSES, 1)}, size=(32, 32))
    archive = tmp_path / "cifar10-jpeg" / "cifar10-jpg.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "train", arcname="train")
    with pytest.raises(DataError, match=r"cifar10-jpg.tar.gz: no test/ folder in the archive"):
        load_data(_cifar_spec(tmp_path, tmp_path / "cache"))


# ----------------------------------------------------------------- cifar10-jpeg (real)


@pytest.mark.slow
def test_cifar10_jpeg_real_archive(tmp_path: Path) -> None:
    # Decodes the real archive (SPIRALKIT_DATA_DIR) once, ~10-30 s, then reads the cache.
    spec = DataSpec(name="cifar10-jpeg", kwargs={"cache_dir": str(tmp_path), "train_subset": 1000})
    data = load_data(spec)
    assert (data.train.num_examples, data.val.num_examples, data.test.num_examples) == (1000, 5000, 10000)
    _, test_y = _all(data.test)
    assert torch.bincount(test_y).tolist() == [1000] * 10
    assert torch.bincount(_all(data.train)[1]).tolist() == [100] * 10
    again = load_data(spec)
    assert torch.equal(_all(again.val)[0], _all(data.val)[0])
