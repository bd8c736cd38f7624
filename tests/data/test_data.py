"""Tests of spiralkit.data: TensorLoader, the built-in sources, idx parsing and errors."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch

from spiralkit.data import DataSpec, DataSplits, Loader, TensorLoader, load_data
from spiralkit.data.idx import parse_idx_images, parse_idx_labels
from spiralkit.data.splits import stable_order, stratified_split
from spiralkit.errors import DataError

MNIST_ZERO = (0.0 - 0.1307) / 0.3081  # a black MNIST pixel after normalisation


# ------------------------------------------------------------------------ module:function


def tiny_loaders(*, n: int = 12, num_classes: int = 3, with_test: bool = True) -> tuple:
    """A data factory referenced as ``tests.data.test_data:tiny_loaders``."""
    x = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
    y = torch.arange(n) % num_classes
    train = TensorLoader(x, y, batch_size=4, shuffle=True)
    val = TensorLoader(x[:6], y[:6], batch_size=3, shuffle=False)
    if not with_test:
        return train, val
    return train, val, TensorLoader(x[6:], y[6:], batch_size=3, shuffle=False)


def not_loaders() -> list:
    return ["train", "val"]


def bad_val_loader() -> tuple:
    return tiny_loaders()[0], 42


def _ys(loader: TensorLoader) -> list[int]:
    return torch.cat([y for _, y in loader]).tolist()


def _loader(n: int = 10, *, batch_size: int = 4, shuffle: bool = True, **options) -> TensorLoader:
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1) * 10.0
    return TensorLoader(x, torch.arange(n), batch_size=batch_size, shuffle=shuffle, **options)


# --------------------------------------------------------------------------- TensorLoader


def test_tensor_loader_same_seed_and_epoch_give_same_order() -> None:
    a, b = _loader(50, seed=7), _loader(50, seed=7)
    a.set_epoch(3)
    b.set_epoch(3)
    assert _ys(a) == _ys(b)
    a.set_epoch(4)
    b.set_epoch(3)
    assert _ys(a) != _ys(b)
    assert _ys(_loader(50, seed=8)) != _ys(_loader(50, seed=7))


def test_tensor_loader_order_is_the_documented_permutation() -> None:
    loader = _loader(20, seed=5)
    loader.set_epoch(2)
    expected = torch.randperm(20, generator=torch.Generator().manual_seed(7)).tolist()
    assert _ys(loader) == expected


def test_tensor_loader_epoch_counter_advances_after_full_pass_only() -> None:
    loader, reference = _loader(30), _loader(30)
    first = _ys(loader)
    assert loader.epoch == 1
    next(iter(loader))  # a partial pass does not advance the epoch
    assert loader.epoch == 1
    second = _ys(loader)
    reference.set_epoch(1)
    assert first != second
    assert second == _ys(reference)


def test_tensor_loader_covers_every_example_once_and_keeps_pairs() -> None:
    loader = _loader(23, batch_size=5)
    for _ in range(2):
        xs, ys = zip(*loader, strict=True)
        x, y = torch.cat(xs), torch.cat(ys)
        assert sorted(y.tolist()) == list(range(23))
        assert torch.equal(x.squeeze(1), y.float() * 10.0)


def test_tensor_loader_batch_sizes_and_len() -> None:
    loader = _loader(10, batch_size=4)
    assert [len(y) for _, y in loader] == [4, 4, 2]
    assert len(loader) == 3 and loader.num_examples == 10 and loader.batch_size == 4
    dropping = _loader(10, batch_size=4, drop_last=True)
    assert [len(y) for _, y in dropping] == [4, 4]
    assert len(dropping) == 2


def test_tensor_loader_without_shuffle_keeps_stored_order() -> None:
    loader = _loader(9, shuffle=False)
    assert _ys(loader) == list(range(9))
    assert _ys(loader) == list(range(9))


@pytest.mark.parametrize("shuffle", [True, False])
def test_tensor_loader_shards_are_disjoint_equal_and_cover_the_epoch(shuffle: bool) -> None:
    full = _loader(11, batch_size=2, shuffle=shuffle, seed=3)
    shards = [full.shard(rank, 3) for rank in range(3)]
    for epoch in (0, 1):
        parts = []
        for shard in shards:
            shard.set_epoch(epoch)
            parts.append(_ys(shard))
        assert {len(p) for p in parts} == {3}
        assert {len(s) for s in shards} == {2}
        union = [i for p in parts for i in p]
        assert len(set(union)) == 9  # disjoint; 11 - 11 % 3 examples used
        full.set_epoch(epoch)
        assert set(union) == set(_ys(full)[:9])
    # Same rank, same epoch: same batches (deterministic across processes).
    again = full.shard(1, 3)
    again.set_epoch(1)
    assert _ys(again) == parts[1]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: TensorLoader(torch.zeros(3, 2), torch.zeros(4), batch_size=2, shuffle=True),
         "same number of rows"),
        (lambda: TensorLoader(torch.zeros(3, 2), torch.zeros(3), batch_size=0, shuffle=True),
         "batch_size"),
        (lambda: TensorLoader(torch.zeros(0, 2), torch.zeros(0), batch_size=2, shuffle=True),
         "no examples"),
        (lambda: _loader(3, batch_size=4, drop_last=True), "leaves no batch"),
        (lambda: _loader(10).shard(3, 3), "rank"),
        (lambda: _loader(2).shard(0, 3), "cannot be split"),
        (lambda: _loader(10).shard(0, 2).shard(0, 2), "already a shard"),
        (lambda: _loader(10).set_epoch(-1), "epoch"),
    ],
)
def test_tensor_loader_rejects_bad_input(build, message: str) -> None:
    with pytest.raises(DataError, match=message):
        build()


def test_tensor_loader_is_a_loader() -> None:
    assert isinstance(_loader(), Loader)


# ------------------------------------------------------------------------------- splits


def test_stable_order_is_a_fixed_permutation() -> None:
    order = stable_order(1000, seed=1)
    assert sorted(order.tolist()) == list(range(1000))
    assert order.tolist() != list(range(1000))
    # Pinned so that held-out splits can never silently change between versions.
    assert stable_order(8, seed=0).tolist() == _PINNED_ORDER_8


_PINNED_ORDER_8 = [2, 4, 6, 5, 1, 7, 0, 3]


def test_stratified_split_hits_exact_total_and_proportions() -> None:
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    kept, held = stratified_split(labels, n_held=10, seed=0)
    assert len(held) == 10 and len(kept) == 90
    assert np.bincount(labels[held]).tolist() == [5, 3, 2]
    assert not set(kept) & set(held)


# ---------------------------------------------------------------------------- DataSpec


def test_data_spec_validates_fields() -> None:
    with pytest.raises(pydantic.ValidationError, match="batch_size"):
        DataSpec(name="digits", batch_size=0)
    with pytest.raises(pydantic.ValidationError, match="val_fraction"):
        DataSpec(name="digits", val_fraction=1.0)
    with pytest.raises(pydantic.ValidationError, match="shuffle"):
        DataSpec(name="digits", shuffle=True)
    spec = DataSpec(name="digits")
    with pytest.raises(pydantic.ValidationError):
        spec.batch_size = 3  # frozen
    assert DataSpec(name="a:b").kwargs == {} and DataSpec(name="a:b").kwargs is not spec.kwargs


def test_unknown_name_lists_known_sources() -> None:
    with pytest.raises(DataError, match=r"'cifar'.*cifar10-jpeg, digits, fashion-mnist, imagefolder, mnist, mnist-sample, sst2, text-tsv"):
        load_data(DataSpec(name="cifar"))


# ------------------------------------------------------------------------- mnist-sample


@pytest.fixture(scope="module")
def mnist_sample() -> DataSplits:
    return load_data(DataSpec(name="mnist-sample"), seed=0)


def _tensors(loader: Loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.tobytes() for row in x.reshape(len(x), -1).numpy()}


def test_mnist_sample_sizes_and_types(mnist_sample: DataSplits) -> None:
    assert mnist_sample.train.num_examples == 3600
    assert mnist_sample.val.num_examples == 400
    assert mnist_sample.test is not None and mnist_sample.test.num_examples == 1000
    assert mnist_sample.input_shape == (1, 28, 28) and mnist_sample.num_classes == 10
    x, y = next(iter(mnist_sample.val))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (400, 1, 28, 28)  # eval_batch_size 1000 > 400
    assert x.min().item() == pytest.approx(MNIST_ZERO)
    assert x.max().item() == pytest.approx((1.0 - 0.1307) / 0.3081)


def test_mnist_sample_test_and_val_are_class_balanced(mnist_sample: DataSplits) -> None:
    _, test_y = _tensors(mnist_sample.test)
    _, val_y = _tensors(mnist_sample.val)
    assert torch.bincount(test_y).tolist() == [100] * 10
    assert torch.bincount(val_y).tolist() == [40] * 10


def test_mnist_sample_splits_do_not_overlap(mnist_sample: DataSplits) -> None:
    train, val, test = (_rows(_tensors(part)[0]) for part in
                        (mnist_sample.train, mnist_sample.val, mnist_sample.test))
    assert len(train) + len(val) + len(test) == 5000  # also: no duplicates within a split
    assert not train & val and not train & test and not val & test


def test_mnist_sample_is_deterministic_and_seed_only_shuffles(mnist_sample: DataSplits) -> None:
    other = load_data(DataSpec(name="mnist-sample"), seed=1)
    for a, b in ((mnist_sample.val, other.val), (mnist_sample.test, other.test)):
        assert all(torch.equal(p, q) for p, q in zip(_tensors(a), _tensors(b), strict=True))
    # Epoch e is shuffled with seed + e, so run seed 1 at epoch 0 sees exactly what run
    # seed 0 sees at epoch 1; this holds only if both calls stored the same training data.
    mnist_sample.train.set_epoch(1)
    other.train.set_epoch(0)
    first, second = _tensors(mnist_sample.train), _tensors(other.train)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    mnist_sample.train.set_epoch(0)
    assert not torch.equal(_tensors(mnist_sample.train)[1], second[1])


# ------------------------------------------------------------------------- digits


def test_digits_sizes_and_standardisation() -> None:
    splits = load_data(DataSpec(name="digits", batch_size=64))
    assert (splits.train.num_examples, splits.val.num_examples) == (1294, 144)
    assert splits.test is not None and splits.test.num_examples == 359
    assert splits.input_shape == (1, 8, 8) and splits.num_classes == 10
    x, y = _tensors(splits.train)
    assert x.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert x.std().item() == pytest.approx(1.0, abs=1e-4)
    assert len(splits.train) == 21 and y.dtype == torch.int64
    _, test_y = _tensors(splits.test)
    assert torch.bincount(test_y).tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]


def test_limit_train_and_seed_leave_val_and_test_alone() -> None:
    full = load_data(DataSpec(name="digits"), seed=0)
    small = load_data(DataSpec(name="digits", limit_train=100), seed=3)
    assert small.train.num_examples == 100
    for a, b in ((full.val, small.val), (full.test, small.test)):
        assert all(torch.equal(p, q) for p, q in zip(_tensors(a), _tensors(b), strict=True))
    assert _rows(_tensors(small.train)[0]) <= _rows(_tensors(full.train)[0])
    assert len(set(_tensors(small.train)[1].tolist())) == 10  # a spread-out subset


# ------------------------------------------------------------------- mnist (real files)


def test_mnist_from_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    # Relies on SPIRALKIT_DATA_DIR pointing at the shared data (CI and `make test` set it).
    splits = load_data(DataSpec(name="mnist", val_fraction=0.1))
    assert splits.train.num_examples == 54_000
    assert splits.val.num_examples == 6_000
    assert splits.test is not None and splits.test.num_examples == 10_000
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    x, y = next(iter(splits.test))
    assert y[:5].tolist() == [7, 2, 1, 0, 4]  # the canonical first t10k labels
    assert x.shape == (1000, 1, 28, 28) and x.dtype == torch.float32
    assert x.min().item() == pytest.approx(MNIST_ZERO)
    _, val_y = _tensors(splits.val)
    assert set(torch.bincount(val_y).tolist()) <= set(range(500, 700))


# ------------------------------------------------------------------ idx (synthetic files)


def _idx_images(pixels: np.ndarray, *, magic: int = 2051) -> bytes:
    n, rows, cols = pixels.shape
    return struct.pack(">4I", magic, n, rows, cols) + pixels.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray, *, magic: int = 2049) -> bytes:
    return struct.pack(">2I", magic, len(labels)) + labels.astype(np.uint8).tobytes()


def _write_mnist(
    root: Path, *, gz: bool, n_train: int = 20, n_test: int = 10, folder_name: str = "mnist"
) -> dict[str, Path]:
    """A tiny 4x4 MNIST in idx format; pixel value = example index, label = index % 10."""
    folder = root / folder_name
    folder.mkdir(parents=True)
    contents = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        pixels = np.repeat(np.arange(n), 16).reshape(n, 4, 4)
        contents[f"{prefix}-images-idx3-ubyte"] = _idx_images(pixels)
        contents[f"{prefix}-labels-idx1-ubyte"] = _idx_labels(np.arange(n) % 10)
    paths = {}
    for name, data in contents.items():
        path = folder / (f"{name}.gz" if gz else name)
        path.write_bytes(gzip.compress(data) if gz else data)
        paths[name] = path
    return paths


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_plain_and_gz_idx(tmp_path: Path, gz: bool) -> None:
    _write_mnist(tmp_path, gz=gz)
    splits = load_data(DataSpec(name="mnist", root=tmp_path, val_fraction=0.1, batch_size=4))
    assert (splits.train.num_examples, splits.val.num_examples) == (18, 2)
    assert splits.input_shape == (1, 4, 4)
    x, y = next(iter(splits.test))
    assert y.tolist() == list(range(10))
    expected = (torch.arange(10.0) / 255 - 0.1307) / 0.3081
    assert torch.allclose(x[:, 0, 2, 3], expected)
    x, y = _tensors(splits.train)
    # Pairs survive the split: pixel value (= original index) matches label.
    index = torch.round((x[:, 0, 0, 0] * 0.3081 + 0.1307) * 255).long()
    assert torch.equal(index % 10, y)


def test_mnist_shift_moves_training_images_only_and_keeps_their_labels(tmp_path: Path) -> None:
    _write_mnist(tmp_path, gz=False, n_train=40)
    plain = load_data(DataSpec(name="mnist", root=tmp_path, val_fraction=0.1, batch_size=8))
    shifted = load_data(DataSpec(name="mnist", root=tmp_path, val_fraction=0.1, batch_size=8, kwargs={"shift": 1}))
    assert shifted.train.augmented and not plain.train.augmented
    assert shifted.train.num_examples == plain.train.num_examples == 36 and shifted.input_shape == (1, 4, 4)
    for split in ("val", "test"):
        assert all(torch.equal(a, b) for a, b in zip(_tensors(getattr(plain, split)), _tensors(getattr(shifted, split))))
    x, y = _tensors(shifted.train)
    assert torch.equal(y, _tensors(plain.train)[1])  # the same order; an image keeps its label
    index = torch.round((x * 0.3081 + 0.1307) * 255).long()  # a shifted 4x4 image: its value, and 0 where padded
    values = index.flatten(1).max(dim=1).values
    assert torch.equal(values % 10, y)  # a shift by at most 1 keeps most of the 4x4 image's pixels
    moved = (index.flatten(1) == 0).any(dim=1) & (values > 0)
    assert moved.sum() > 18  # most images moved (an offset of 0 in both directions keeps 1 in 9)
    shifted.train.set_epoch(0)
    assert torch.equal(_tensors(shifted.train)[0], x)  # reproducible per seed and epoch


def test_mnist_refuses_unknown_data_kwargs(tmp_path: Path) -> None:
    _write_mnist(tmp_path, gz=False)
    with pytest.raises(DataError, match=r"data set 'mnist': bad data.kwargs \(shfit: Extra inputs are not permitted\); "
                                        r"accepted keys: shift"):
        load_data(DataSpec(name="mnist", root=tmp_path, kwargs={"shfit": 1}))
    with pytest.raises(DataError, match=r"bad data.kwargs \(shift: Input should be less than or equal to 8\)"):
        load_data(DataSpec(name="mnist", root=tmp_path, kwargs={"shift": 9}))


@pytest.mark.parametrize("name", ["digits", "mnist-sample"])
def test_data_sets_without_options_refuse_data_kwargs(name: str) -> None:
    with pytest.raises(DataError, match=rf"data set '{name}' takes no data.kwargs; got: shift"):
        load_data(DataSpec(name=name, kwargs={"shift": 2}))


def test_parse_idx_round_trip(tmp_path: Path) -> None:
    pixels = np.arange(2 * 3 * 5).reshape(2, 3, 5)
    images = parse_idx_images(_idx_images(pixels), path=tmp_path / "x")
    assert images.shape == (2, 3, 5) and images.dtype == np.uint8
    assert np.array_equal(images, pixels)
    labels = parse_idx_labels(_idx_labels(np.array([3, 1, 4])), path=tmp_path / "y")
    assert labels.tolist() == [3, 1, 4]


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_bad_magic_names_file(tmp_path: Path, gz: bool) -> None:
    paths = _write_mnist(tmp_path, gz=gz)
    target = paths["train-images-idx3-ubyte"]
    data = _idx_images(np.zeros((20, 4, 4)), magic=2049)
    target.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError, match="bad magic number 2049, expected 2051") as info:
        load_data(DataSpec(name="mnist", root=tmp_path))
    assert str(target) in str(info.value)


def test_mnist_truncated_file_names_file(tmp_path: Path) -> None:
    paths = _write_mnist(tmp_path, gz=False)
    target = paths["t10k-images-idx3-ubyte"]
    target.write_bytes(target.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"truncated: 171 bytes, expected 176") as info:
        load_data(DataSpec(name="mnist", root=tmp_path))
    assert str(target) in str(info.value)
    target.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="shorter than the 16-byte") as info:
        load_data(DataSpec(name="mnist", root=tmp_path))
    assert str(target) in str(info.value)


def test_mnist_count_mismatch_names_files(tmp_path: Path) -> None:
    paths = _write_mnist(tmp_path, gz=False)
    target = paths["train-labels-idx1-ubyte"]
    target.write_bytes(_idx_labels(np.arange(19) % 10))
    with pytest.raises(DataError, match="19 labels but .* 20 images") as info:
        load_data(DataSpec(name="mnist", root=tmp_path))
    assert str(target) in str(info.value)
    assert str(paths["train-images-idx3-ubyte"]) in str(info.value)


def test_mnist_corrupt_gzip_names_file(tmp_path: Path) -> None:
    paths = _write_mnist(tmp_path, gz=True)
    target = paths["train-labels-idx1-ubyte"]
    target.write_bytes(b"definitely not gzip")
    with pytest.raises(DataError, match="not a valid gzip file") as info:
        load_data(DataSpec(name="mnist", root=tmp_path))
    assert str(target) in str(info.value)


def test_mnist_missing_file_names_expected_paths(tmp_path: Path) -> None:
    paths = _write_mnist(tmp_path, gz=True)
    paths["t10k-labels-idx1-ubyte"].unlink()
    with pytest.raises(DataError) as info:
        load_data(DataSpec(name="mnist", root=tmp_path))
    message = str(info.value)
    assert str(tmp_path / "mnist" / "t10k-labels-idx1-ubyte") in message
    assert str(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz") in message
    assert "data.root" in message and "SPIRALKIT_DATA_DIR" in message
    assert "train-images" not in message  # only the missing file is named


def test_mnist_without_any_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPIRALKIT_DATA_DIR", raising=False)
    with pytest.raises(DataError, match=r"no.*set.*data\.root.*SPIRALKIT_DATA_DIR"):
        load_data(DataSpec(name="mnist"))


def test_mnist_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_mnist(tmp_path, gz=False)
    monkeypatch.setenv("SPIRALKIT_DATA_DIR", str(tmp_path))
    assert load_data(DataSpec(name="mnist")).test.num_examples == 10


def _write_sums(root: Path, paths: dict[str, Path], *, wrong: str | None = None) -> None:
    lines = []
    for name, path in paths.items():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if name == wrong:
            digest = "0" * 64
        lines.append(f"{digest}  {path.relative_to(root).as_posix()}\n")
    (root / "SHA256SUMS").write_text("".join(lines))


def test_mnist_checksums_pass_and_mismatch_names_file(tmp_path: Path) -> None:
    paths = _write_mnist(tmp_path, gz=True)
    _write_sums(tmp_path, paths)
    assert load_data(DataSpec(name="mnist", root=tmp_path)).train.num_examples == 18
    _write_sums(tmp_path, paths, wrong="t10k-images-idx3-ubyte")
    with pytest.raises(DataError, match="SHA-256 mismatch") as info:
        load_data(DataSpec(name="mnist", root=tmp_path))
    assert str(paths["t10k-images-idx3-ubyte"]) in str(info.value)


def test_mnist_malformed_checksum_file(tmp_path: Path) -> None:
    _write_mnist(tmp_path, gz=False)
    (tmp_path / "SHA256SUMS").write_text("abc mnist/train-images-idx3-ubyte\n")
    with pytest.raises(DataError, match=r"SHA256SUMS, line 1"):
        load_data(DataSpec(name="mnist", root=tmp_path))


# ----------------------------------------------------------------------- fashion-mnist


def test_fashion_mnist_reads_its_folder_with_its_own_normalisation(tmp_path: Path) -> None:
    paths = _write_mnist(tmp_path, gz=True, folder_name="fashion-mnist")
    _write_sums(tmp_path, paths)
    splits = load_data(DataSpec(name="fashion-mnist", root=tmp_path, val_fraction=0.1, batch_size=4))
    assert (splits.train.num_examples, splits.val.num_examples, splits.num_classes) == (18, 2, 10)
    x, y = next(iter(splits.test))
    assert y.tolist() == list(range(10))
    assert torch.allclose(x[:, 0, 2, 3], (torch.arange(10.0) / 255 - 0.2860) / 0.3530)


def test_fashion_mnist_missing_file_and_checksum_name_the_file(tmp_path: Path) -> None:
    paths = _write_mnist(tmp_path, gz=True, folder_name="fashion-mnist")
    _write_sums(tmp_path, paths, wrong="train-labels-idx1-ubyte")
    with pytest.raises(DataError, match="SHA-256 mismatch") as info:
        load_data(DataSpec(name="fashion-mnist", root=tmp_path))
    assert str(paths["train-labels-idx1-ubyte"]) in str(info.value)
    paths["train-images-idx3-ubyte"].unlink()
    with pytest.raises(DataError, match=r"Fashion-MNIST file\(s\) not found") as info:
        load_data(DataSpec(name="fashion-mnist", root=tmp_path))
    assert str(tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz") in str(info.value)
    assert "contains fashion-mnist/" in str(info.value)


def test_fashion_mnist_from_data_dir() -> None:
    # The real files (SPIRALKIT_DATA_DIR, as for mnist), checked against SHA256SUMS.
    splits = load_data(DataSpec(name="fashion-mnist", val_fraction=0.1))
    assert (splits.train.num_examples, splits.val.num_examples) == (54_000, 6_000)
    assert splits.test is not None and splits.test.num_examples == 10_000
    x, y = next(iter(splits.test))
    assert y[:5].tolist() == [9, 2, 1, 1, 6]  # ankle boot, pullover, trouser, trouser, shirt
    assert torch.bincount(y, minlength=10).sum() == 1000
    train_x, _ = _tensors(splits.train)
    assert abs(train_x.mean().item()) < 0.01 and abs(train_x.std().item() - 1) < 0.01


# ---------------------------------------------------------------------- module:function


def test_module_function_source() -> None:
    spec = DataSpec(name="tests.data.test_data:tiny_loaders", kwargs={"num_classes": 4})
    splits = load_data(spec)
    assert splits.name == spec.name
    assert splits.input_shape == (2,) and splits.num_classes == 4
    assert splits.test is not None and splits.test.num_examples == 6
    assert len(splits.train) == 3 and len(splits.val) == 2


def test_module_function_two_loaders_and_no_num_classes() -> None:
    spec = DataSpec(name="tests.data.test_data:tiny_loaders", kwargs={"with_test": False})
    splits = load_data(spec)
    assert splits.test is None and splits.num_classes is None


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("tests.data.test_data:not_loaders", {}, r"not_loaders.*must return a tuple.*got a list"),
        ("tests.data.test_data:bad_val_loader", {}, r"bad_val_loader.*int as its val loader"),
        ("tests.data.test_data:tiny_loaders", {"colour": 1}, r"tiny_loaders.*colour"),
        ("tests.data.test_data:no_such_function", {}, r"test_data:no_such_function.*has no"),
        ("no_such_package.data:make", {}, r"'no_such_package.data:make'.*cannot import"),
        (":make", {}, r"expected 'package.module:function'"),
    ],
)
def test_module_function_errors(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_data(DataSpec(name=name, kwargs=kwargs))


def test_length_grouped_batches_are_a_reproducible_permutation_of_similar_lengths() -> None:
    from spiralkit.data.loaders import TensorLoader

    torch.manual_seed(0)
    lengths = torch.randint(1, 64, (1000,))
    x = torch.arange(1000)
    loader = TensorLoader(x, x, batch_size=10, shuffle=True, seed=3, lengths=lengths)
    first = [b for b, _ in loader]
    assert torch.equal(torch.cat(first).sort().values, x)  # every example once
    loader.set_epoch(0)
    assert all(torch.equal(a, b) for a, (b, _) in zip(first, loader, strict=True))  # same epoch, same batches
    spread = torch.tensor([float(lengths[b].max() - lengths[b].min()) for b in first]).mean()
    plain = TensorLoader(x, x, batch_size=10, shuffle=True, seed=3)
    plain_spread = torch.tensor([float(lengths[b].max() - lengths[b].min()) for b, _ in plain]).mean()
    assert spread < plain_spread / 4


def test_lengths_of_the_wrong_shape_are_an_error() -> None:
    from spiralkit.data.loaders import TensorLoader

    with pytest.raises(DataError, match=r"lengths must have one entry per example \(4\), got shape \(3,\)"):
        TensorLoader(torch.zeros(4), torch.zeros(4), batch_size=2, shuffle=True, lengths=torch.ones(3))
