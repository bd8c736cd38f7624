"""Crafted compact files: every declared size is checked against the model before anything is allocated."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from spiralkit.errors import ModelError
from spiralkit.quant.compact import load_compressed, save_compressed
from tests.quant.test_compact import TINY, pruned


def _header(data: bytes) -> tuple[dict[str, Any], bytes]:
    (size,) = struct.unpack("<I", data[8:12])
    return json.loads(data[12 : 12 + size]), data[12 + size :]


def _file(header: dict[str, Any], frames: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return b"SPIRALKC" + struct.pack("<I", len(encoded)) + encoded + frames


@pytest.fixture
def saved(tmp_path: Path) -> bytes:
    path = tmp_path / "model.spkc"
    save_compressed(pruned(TINY, 0.5), path, spec=TINY, bits=4)
    return path.read_bytes()


def _load(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "crafted.spkc"
    path.write_bytes(data)
    load_compressed(path)


def test_a_shape_of_128_gib_is_refused_before_allocation(tmp_path: Path, saved: bytes) -> None:
    header, frames = _header(saved)
    record = next(r for r in header["tensors"] if r["name"] == "fc1.weight")
    record["shape"] = [1 << 20, 1 << 15]  # 2^35 float32 = 128 GiB
    with pytest.raises(ModelError, match=r"tensor 'fc1.weight' is declared \[1048576, 32768\] torch.float32, "
                                         r"but the model has \[10, 12\]"):
        _load(tmp_path, _file(header, frames))


def test_a_tensor_the_model_does_not_have_is_refused(tmp_path: Path, saved: bytes) -> None:
    header, frames = _header(saved)
    header["tensors"].append({**header["tensors"][0], "name": "extra.weight"})
    with pytest.raises(ModelError, match="tensor 'extra.weight' is not in the model"):
        _load(tmp_path, _file(header, frames))


def test_a_zstd_bomb_is_refused_without_decompressing_it(tmp_path: Path, saved: bytes) -> None:
    header, _ = _header(saved)
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(1 << 28))  # 256 MiB of zeros in a few KB
    assert len(bomb) < 100_000
    for entry in header["sections"]:
        entry["stored"], entry["size"] = (len(bomb), 1 << 28) if entry["name"] == "raw" else (0, 0)
    started = time.perf_counter()
    with pytest.raises(ModelError, match=r"section 'raw' declares 268435456 bytes; this model's files hold at most \d+"):
        _load(tmp_path, _file(header, bomb))
    assert time.perf_counter() - started < 5


def test_a_frame_larger_than_its_declared_size_is_cut_off(tmp_path: Path, saved: bytes) -> None:
    header, _ = _header(saved)
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(1 << 28))
    for entry in header["sections"]:
        entry["stored"], entry["size"] = (len(bomb), 100) if entry["name"] == "raw" else (0, 0)
    with pytest.raises(ModelError, match="section 'raw' has more than 100 bytes, the header says 100"):
        _load(tmp_path, _file(header, bomb))


@given(st.data())
def test_any_corruption_gives_a_model_or_a_model_error(data: st.DataObject) -> None:
    """Property: bytes flipped, cut or inserted anywhere, or header values replaced — never another exception."""
    import tempfile  # noqa: PLC0415 - hypothesis runs many examples per tmp_path

    base = _SAVED
    kind = data.draw(st.sampled_from(["flip", "cut", "insert", "header"]))
    if kind == "flip":
        at = data.draw(st.integers(0, len(base) - 1))
        crafted = base[:at] + bytes([base[at] ^ data.draw(st.integers(1, 255))]) + base[at + 1 :]
    elif kind == "cut":
        crafted = base[: data.draw(st.integers(0, len(base)))]
    elif kind == "insert":
        at = data.draw(st.integers(0, len(base)))
        crafted = base[:at] + data.draw(st.binary(min_size=1, max_size=16)) + base[at:]
    else:
        header, frames = _header(base)
        value = data.draw(st.one_of(st.none(), st.integers(-(2**40), 2**40), st.text(max_size=6),
                                    st.lists(st.integers(-5, 2**33), max_size=3)))
        target = data.draw(st.sampled_from(["sections", "tensors", "top"]))
        if target == "top":
            header[data.draw(st.sampled_from(sorted(header)))] = value
        else:
            entry = data.draw(st.sampled_from(header[target]))
            entry[data.draw(st.sampled_from(sorted(entry)))] = value
        crafted = _file(header, frames)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        try:
            _load(Path(scratch), crafted)
        except ModelError as exc:
            assert str(exc)
    assert time.perf_counter() - started < 10


def _saved_once() -> bytes:
    import tempfile  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "model.spkc"
        save_compressed(pruned(TINY, 0.5), path, spec=TINY, bits=4)
        return path.read_bytes()


_SAVED = _saved_once()
