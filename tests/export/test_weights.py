"""Dense and sparse weights files, and atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from spiralkit.errors import ModelError, StorageError
from spiralkit.export import (
    atomic_write_bytes,
    atomic_write_text,
    load_sparse,
    load_state,
    save_sparse,
    save_weights,
)


def bits(tensor: Tensor) -> bytes:
    """The raw bytes of a tensor, for bit-exact comparison (NaN included)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_exact(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert actual[name].shape == tensor.shape, name
        assert bits(actual[name]) == bits(tensor), name


def mixed_state() -> dict[str, Tensor]:
    """Sparse and dense tensors of several dtypes, odd shapes and special values."""
    generator = torch.Generator().manual_seed(0)
    sparse = torch.randn(64, 33, generator=generator)
    sparse[torch.rand(64, 33, generator=generator) < 0.9] = 0.0
    sparse[0, :4] = torch.tensor([1e-30, float("nan"), float("inf"), -float("inf")])
    return {
        "sparse": sparse,
        "sparse_half": sparse.half(),
        "sparse_bf16": sparse.bfloat16(),
        "dense": torch.randn(7, 3, generator=generator),
        "ints": torch.tensor([0, 0, 5, 0] * 100, dtype=torch.int64),
        "flags": torch.rand(1000, generator=generator) < 0.01,
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(5, 9, generator=generator).t(),
    }


def test_dense_round_trip(tmp_path: Path) -> None:
    state = mixed_state()
    written = save_weights(state, tmp_path / "w.safetensors")
    assert written == (tmp_path / "w.safetensors").stat().st_size
    assert_bit_exact(load_state(tmp_path / "w.safetensors"), state)


def test_sparse_round_trip_is_bit_exact(tmp_path: Path) -> None:
    state = mixed_state()
    written = save_sparse(state, tmp_path / "s.safetensors")
    assert written == (tmp_path / "s.safetensors").stat().st_size
    assert_bit_exact(load_sparse(tmp_path / "s.safetensors"), state)


def test_sparse_treats_negative_zero_as_zero(tmp_path: Path) -> None:
    # Pruning w·0 leaves -0.0 behind; it must not cost a stored value.
    state = {"w": -torch.rand(1000)}
    state["w"][100:] = -0.0
    plain = {"w": state["w"].clone()}
    plain["w"][100:] = 0.0
    assert save_sparse(state, tmp_path / "s.safetensors") == save_sparse(plain, tmp_path / "p.safetensors")
    loaded = load_sparse(tmp_path / "s.safetensors")["w"]
    assert torch.equal(loaded, state["w"]) and not torch.signbit(loaded[100:]).any()


def test_sparse_is_smaller_for_sparse_tensors(tmp_path: Path) -> None:
    weight = torch.zeros(100, 100)
    weight[::10, ::10] = 1.0  # 1% non-zero
    sparse = save_sparse({"w": weight}, tmp_path / "s.safetensors")
    dense = save_weights({"w": weight}, tmp_path / "d.safetensors")
    assert sparse < 0.1 * dense  # 1250 bytes of mask + 400 bytes of values vs 40,000


def test_load_state_reads_sparse_files(tmp_path: Path) -> None:
    state = mixed_state()
    save_sparse(state, tmp_path / "s.safetensors")
    assert_bit_exact(load_state(tmp_path / "s.safetensors"), state)


def test_tied_tensors_stored_once(tmp_path: Path) -> None:
    embedding = nn.Embedding(1000, 16)
    model = nn.Sequential(embedding, nn.Linear(16, 1000, bias=False))
    model[1].weight = embedding.weight
    single = save_weights({"w": embedding.weight}, tmp_path / "single.safetensors")
    for save, load, name in ((save_weights, load_state, "d"), (save_sparse, load_sparse, "s")):
        written = save(model, tmp_path / f"{name}.safetensors")
        assert written < single + 512
        loaded = load(tmp_path / f"{name}.safetensors")
        assert_bit_exact(loaded, {k: v.detach() for k, v in model.state_dict().items()})


def test_overlapping_views_are_copied(tmp_path: Path) -> None:
    base = torch.arange(10.0)
    state = {"a": base[:6], "b": base[4:]}
    save_weights(state, tmp_path / "w.safetensors")
    assert_bit_exact(load_state(tmp_path / "w.safetensors"), state)


def test_plain_safetensors_files_load(tmp_path: Path) -> None:
    save_file({"x": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    assert torch.equal(load_state(tmp_path / "plain.safetensors")["x"], torch.ones(2))


def test_load_sparse_rejects_dense_file(tmp_path: Path) -> None:
    save_weights({"x": torch.ones(2)}, tmp_path / "d.safetensors")
    with pytest.raises(ModelError, match="is not a spiralkit sparse weights file"):
        load_sparse(tmp_path / "d.safetensors")


def test_load_missing_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=f"weights file not found: {tmp_path / 'nope.safetensors'}"):
        load_state(tmp_path / "nope.safetensors")


def test_non_tensor_state_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="state entry 'step' is a int"):
        save_weights({"step": 3}, tmp_path / "w.safetensors")  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_leave_no_temp_files(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a.txt", "héllo\n")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "a.txt", "again")
    save_weights({"x": torch.ones(3)}, tmp_path / "w.safetensors")
    save_sparse({"x": torch.ones(3)}, tmp_path / "s.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "s.safetensors", "w.safetensors"]
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "again"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


def test_failed_atomic_write_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "keep.txt"
    target.write_text("old")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StorageError, match=f"^cannot write {target}: disk full$"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_write_uses_normal_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write_text(tmp_path / "p.txt", "x")
    assert (tmp_path / "p.txt").stat().st_mode & 0o777 == 0o666 & ~umask
