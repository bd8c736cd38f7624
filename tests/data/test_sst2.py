"""SST-2: TSV parsing, tokenised splits, the data root, and errors that name the file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from spiralkit.data import DataSpec, load_data
from spiralkit.data.sources import DATA_DIR_ENV
from spiralkit.data.sst2 import UNLABELED, splice_sentences
from spiralkit.errors import DataError

transformers = pytest.importorskip("transformers")

TRAIN = [("a good movie .", 1), ("a bad movie .", 0), ("the plot", 1), ("bad bad bad", 0), ("good", 1),
         ("the bad plot .", 0), ("a good good plot .", 1), ("movie", 0), ("the movie .", 1), ("a plot", 0)]
DEV = [("good movie", 1), ("the bad movie .", 0), ("a", 1)]


def _write(path: Path, rows: list[tuple[str, int]], *, header: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["sentence\tlabel"] if header else []) + [f"{sentence} \t{label}" for sentence, label in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    _write(tmp_path / "sst2" / "train.tsv", TRAIN)
    _write(tmp_path / "sst2" / "dev.tsv", DEV, header=False)
    return tmp_path


def _spec(root: Path | None, tokenizer: Path, **fields: object) -> DataSpec:
    kwargs = {"tokenizer": str(tokenizer), "max_length": 8, **fields.pop("kwargs", {})}  # type: ignore[dict-item]
    return DataSpec(name="sst2", root=root, batch_size=4, eval_batch_size=8, val_fraction=0.2, kwargs=kwargs, **fields)


def test_splits_are_tokenised_packed_and_dev_is_the_test_split_longest_first(root: Path, tokenizer_dir: Path) -> None:
    data = load_data(_spec(root, tokenizer_dir))
    assert data.input_shape == (2, 8) and data.num_classes == 2
    assert (len(data.train), len(data.val), len(data.test)) == (2, 1, 1)
    x, y = next(iter(data.test))
    assert x.dtype == torch.int64 and x.shape == (3, 2, 8)
    # Longest first: "the bad movie .", "good movie", "a".
    assert y.tolist() == [0, 1, 1] and x[:, 1].sum(1).tolist() == [6, 4, 3]
    # "good movie" → [CLS] good movie [SEP], then padding, with its mask
    assert x[1].tolist() == [[2, 6, 8, 3, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]]
    val_x, val_y = next(iter(data.val))
    assert val_x.shape[0] == 2 and sorted(val_y.tolist()) == [0, 1]  # stratified 20% of 10
    train_labels = torch.cat([batch[1] for batch in data.train])
    assert len(train_labels) == 8 and int(train_labels.sum()) == 4


def test_long_sentences_are_truncated_to_max_length(root: Path, tokenizer_dir: Path) -> None:
    _write(root / "sst2" / "dev.tsv", [("a good good good good good good good movie", 1)])
    x, _ = next(iter(load_data(_spec(root, tokenizer_dir, kwargs={"max_length": 5})).test))
    assert x[0].tolist() == [[2, 5, 6, 6, 3], [1, 1, 1, 1, 1]]


def test_limit_train_keeps_a_fixed_subset_and_the_same_validation(root: Path, tokenizer_dir: Path) -> None:
    full = load_data(_spec(root, tokenizer_dir))
    limited = load_data(_spec(root, tokenizer_dir, limit_train=3))
    assert limited.train.num_examples == 3
    assert torch.equal(next(iter(limited.val))[0], next(iter(full.val))[0])
    again = load_data(_spec(root, tokenizer_dir, limit_train=3), seed=5)
    assert sorted(map(tuple, torch.cat([b[0] for b in again.train]).flatten(1).tolist())) == sorted(
        map(tuple, torch.cat([b[0] for b in limited.train]).flatten(1).tolist())
    )


def test_splice_adds_unlabeled_training_sentences_from_training_sentences_only(root: Path, tokenizer_dir: Path) -> None:
    plain = load_data(_spec(root, tokenizer_dir))
    spliced = load_data(_spec(root, tokenizer_dir, kwargs={"splice": 2}))
    train_x, train_y = (torch.cat(parts) for parts in zip(*spliced.train, strict=True))
    assert spliced.train.num_examples == 3 * plain.train.num_examples == 24
    assert int((train_y == UNLABELED).sum()) == 16 and set(train_y[train_y != UNLABELED].tolist()) == {0, 1}
    for name in ("val", "test"):  # untouched
        assert torch.equal(next(iter(getattr(spliced, name)))[0], next(iter(getattr(plain, name)))[0])
    plain_x = torch.cat([x for x, _ in plain.train])
    assert set(train_x[:, 0].unique().tolist()) <= set(plain_x[:, 0].unique().tolist())
    assert train_x[train_y == UNLABELED, 1].sum(1).min() >= 4  # [CLS], a start, an end, [SEP]
    # The training prefix (limit_train) is taken before splicing, so spliced rows survive it.
    assert load_data(_spec(root, tokenizer_dir, limit_train=3, kwargs={"splice": 1})).train.num_examples == 6


def test_splice_sentences_joins_a_start_to_an_end_reproducibly() -> None:
    sentences = ["a b c", "d e f g"]
    made = splice_sentences(sentences, 50, seed=3)
    assert len(made) == 50 and made == splice_sentences(sentences, 50, seed=3)
    assert made != splice_sentences(sentences, 50, seed=4)
    sources = [sentence.split() for sentence in sentences]

    def is_splice(words: list[str]) -> bool:
        return any(
            any(words[:cut] == source[:cut] for source in sources)
            and any(words[cut:] == source[len(source) - (len(words) - cut):] for source in sources)
            for cut in range(1, len(words))
        )

    assert all(is_splice(sentence.split()) for sentence in made)
    assert any(sentence.split()[0] == "a" and sentence.split()[-1] == "g" for sentence in made)  # mixes both


def test_root_comes_from_the_environment_when_the_spec_has_none(
    root: Path, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(root))
    assert load_data(_spec(None, tokenizer_dir)).test.num_examples == 3
    monkeypatch.delenv(DATA_DIR_ENV)
    with pytest.raises(DataError, match=f"data set 'sst2' needs a data directory.*{DATA_DIR_ENV}"):
        load_data(_spec(None, tokenizer_dir))


# --------------------------------------------------------------------------- errors


def test_missing_files_are_named(tmp_path: Path, tokenizer_dir: Path) -> None:
    _write(tmp_path / "sst2" / "train.tsv", TRAIN)
    with pytest.raises(DataError, match=f"SST-2 file\\(s\\) not found: {tmp_path / 'sst2' / 'dev.tsv'}"):
        load_data(_spec(tmp_path, tokenizer_dir))
    with pytest.raises(DataError, match=f"data root {tmp_path / 'nowhere'} does not exist"):
        load_data(_spec(tmp_path / "nowhere", tokenizer_dir))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"sentence\tlabel\na fine movie\t2\n", r"train.tsv, line 2: label must be 0 or 1, got '2'"),
        (b"a movie without a label\n", r"train.tsv, line 1: expected 'sentence<TAB>label', got 'a movie without"),
        (b"\t1\n", r"train.tsv, line 1: expected 'sentence<TAB>label'"),
        (b"sentence\tlabel\n", r"train.tsv: no examples"),
        (b"caf\xe9\t1\n", r"train.tsv: not UTF-8 text"),
    ],
)
def test_malformed_files_are_named_with_the_line(
    root: Path, tokenizer_dir: Path, content: bytes, message: str
) -> None:
    (root / "sst2" / "train.tsv").write_bytes(content)
    with pytest.raises(DataError, match=f"{root / 'sst2'}/{message}"):
        load_data(_spec(root, tokenizer_dir))


def test_checksum_mismatch_names_the_file(root: Path, tokenizer_dir: Path) -> None:
    digest = hashlib.sha256((root / "sst2" / "dev.tsv").read_bytes()).hexdigest()
    (root / "SHA256SUMS").write_text(f"{digest}  sst2/dev.tsv\n{'0' * 64}  sst2/train.tsv\n")
    with pytest.raises(DataError, match=f"{root / 'sst2' / 'train.tsv'}: SHA-256 mismatch"):
        load_data(_spec(root, tokenizer_dir))


def test_bad_kwargs_and_tokenizers_are_named(root: Path, tokenizer_dir: Path) -> None:
    with pytest.raises(DataError, match=r"bad data.kwargs \(maxlen: Extra inputs.*accepted keys: tokenizer, max_length"):
        load_data(_spec(root, tokenizer_dir, kwargs={"maxlen": 4}))
    with pytest.raises(DataError, match=r"max_length: Input should be greater than or equal to 2"):
        load_data(_spec(root, tokenizer_dir, kwargs={"max_length": 1}))
    with pytest.raises(DataError, match=f"data.kwargs.tokenizer '{root / 'none'}': {root / 'none'} does not exist"):
        load_data(_spec(root, root / "none"))


# --------------------------------------------------------------------------- the real data


def test_the_real_sst2_files_load_with_the_packaged_tokenizer() -> None:
    root = Path(os.environ.get(DATA_DIR_ENV, ""))
    if not (root / "sst2" / "train.tsv").is_file():
        pytest.skip("the SST-2 files are not available")
    data = load_data(DataSpec(name="sst2", root=root, limit_train=500, val_fraction=0.01, kwargs={"max_length": 64}))
    assert data.train.num_examples == 500 and data.val.num_examples == 673 and data.test.num_examples == 872
    x, y = next(iter(data.test))
    assert x.shape[1:] == (2, 64) and x[0, 0, 0] == 101  # [CLS] of the uncased BERT vocabulary
    assert set(y.tolist()) == {0, 1}
