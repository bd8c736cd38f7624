"""TinyStories as byte-level next-token windows: reading, splitting by story, windows, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spiralkit.data import DataSpec, load_data
from spiralkit.data.tinystories import (
    BYTE_VOCAB,
    decode_bytes,
    encode_bytes,
    next_token_windows,
    read_stories,
    split_stories,
)
from spiralkit.errors import DataError

STORIES = [f"Story {i}: Tom saw a {'big ' * i}dog.\nThe end." for i in range(20)]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A data root holding a small tinystories file of 20 stories separated by blank lines."""
    (tmp_path / "tinystories").mkdir()
    (tmp_path / "tinystories" / "tinystories_val.txt").write_text("\n\n".join(STORIES) + "\n", encoding="utf-8")
    return tmp_path


def test_stories_are_paragraphs_with_whitespace_collapsed(root: Path) -> None:
    stories = read_stories(root / "tinystories" / "tinystories_val.txt", root=root)
    assert stories == [s.replace("\n", " ") for s in STORIES]


def test_split_keeps_stories_whole_and_in_file_order() -> None:
    train, val, test = split_stories(list("abcdefghijklmnopqrst"), val_fraction=0.1, test_fraction=0.25)
    assert (train, val, test) == (list("abcdefghijklm"), list("no"), list("pqrst"))


def test_a_split_without_a_story_is_refused() -> None:
    assert split_stories(["a", "b", "c"], val_fraction=0.4, test_fraction=0.4) == (["a"], ["b"], ["c"])
    with pytest.raises(DataError, match=r"4 stories cannot be split into train, validation \(0.45\) and test \(0.45\)"):
        split_stories(["a", "b", "c", "d"], val_fraction=0.45, test_fraction=0.45)


def test_windows_are_inputs_and_targets_shifted_by_one() -> None:
    inputs, targets = next_token_windows(torch.arange(11), 3)
    assert inputs.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert targets.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    with pytest.raises(DataError, match="val text: 3 tokens cannot fill one window of seq_len=3"):
        next_token_windows(torch.arange(3), 3, what="val text")


def test_byte_tokens_round_trip_including_non_ascii() -> None:
    tokens = encode_bytes("Tom’s café")
    assert tokens.dtype == torch.int64 and int(tokens.max()) < BYTE_VOCAB
    assert len(tokens) == len("Tom’s café".encode())
    assert decode_bytes(tokens) == "Tom’s café"


def test_loader_gives_byte_windows_of_held_out_stories(root: Path) -> None:
    spec = DataSpec(name="tinystories", root=root, batch_size=4, eval_batch_size=3, val_fraction=0.1,
                    kwargs={"seq_len": 16, "test_fraction": 0.2})
    splits = load_data(spec, seed=0)
    assert splits.input_shape == (16,) and splits.num_classes is None
    x, y = next(iter(splits.train))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # next-byte targets
    test_x = torch.cat([bx for bx, _ in splits.test])
    # the test split is the last 4 stories (20 · 0.2), joined by blank lines, from its first byte on
    expected = "\n\n".join(s.replace("\n", " ") for s in STORIES[16:])
    assert decode_bytes(test_x.reshape(-1)) == expected[: test_x.numel()]
    val_text = decode_bytes(torch.cat([bx for bx, _ in splits.val]).reshape(-1))
    assert val_text.startswith("Story 14:") and "Story 16" not in val_text


def test_limit_train_keeps_the_first_windows(root: Path) -> None:
    spec = DataSpec(name="tinystories", root=root, batch_size=100, limit_train=5, kwargs={"seq_len": 8})
    (x, _), = list(load_data(spec, seed=0).train)
    assert x.shape == (5, 8)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    spec = DataSpec(name="tinystories", root=tmp_path)
    with pytest.raises(DataError, match=r"TinyStories file not found: expected .*tinystories/tinystories_val\.txt"):
        load_data(spec)


def test_bad_kwargs_name_the_key(root: Path) -> None:
    with pytest.raises(DataError, match=r"data set 'tinystories': bad data.kwargs \(seq_length: Extra inputs"):
        load_data(DataSpec(name="tinystories", root=root, kwargs={"seq_length": 8}))


def test_a_split_too_short_for_a_window_is_named(root: Path) -> None:
    with pytest.raises(DataError, match="tinystories train split: 1028 tokens cannot fill one window of seq_len=4000"):
        load_data(DataSpec(name="tinystories", root=root, kwargs={"seq_len": 4000}))


def test_the_real_file_loads_and_matches_its_checksum() -> None:
    # SPIRALKIT_DATA_DIR points at the offline data (tests/conftest.py); SHA256SUMS lists the file.
    splits = load_data(DataSpec(name="tinystories", eval_batch_size=1000, kwargs={"seq_len": 128}), seed=0)
    test_windows = sum(x.shape[0] for x, _ in splits.test)
    assert 500 < test_windows < 700  # 10% of ~785 kB of stories in windows of 128 bytes
