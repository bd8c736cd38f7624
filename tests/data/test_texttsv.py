"""text-tsv: sentence classification from tab-separated or 'LABEL sentence' files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spiralkit.data import DataSpec, load_data
from spiralkit.data.texttsv import class_order
from spiralkit.errors import DataError

pytest.importorskip("transformers")

TRAIN = [("good movie", "pos"), ("bad movie", "neg"), ("the plot", "meh"), ("a good plot .", "pos"),
         ("bad bad", "neg"), ("the movie", "meh"), ("good good", "pos"), ("a bad plot", "neg"),
         ("plot .", "meh"), ("movie", "pos")]
TEST = [("good", "pos"), ("the bad movie .", "neg"), ("a plot", "meh")]


def _write(path: Path, rows: list[tuple[str, str]], *, label_first: bool = False, header: str | None = None) -> Path:
    lines = [header] if header else []
    lines += [f"{label} {text}" if label_first else f"{label}\t{text}\textra" for text, label in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _spec(tmp_path: Path, tokenizer: Path, **kwargs: object) -> DataSpec:
    options = {"train": str(tmp_path / "train.tsv"), "test": str(tmp_path / "test.tsv"), "tokenizer": str(tokenizer),
               "max_length": 8, "text_column": 1, "label_column": 0, **kwargs}
    return DataSpec(name="text-tsv", batch_size=4, eval_batch_size=8, val_fraction=0.3, kwargs=options)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    _write(tmp_path / "train.tsv", TRAIN, header="label\ttext\tnote")
    _write(tmp_path / "test.tsv", TEST, header="label\ttext\tnote")
    return tmp_path


def test_columns_three_classes_tokenised_like_sst2(files: Path, tokenizer_dir: Path) -> None:
    data = load_data(_spec(files, tokenizer_dir, header=True))
    assert data.class_names == ("meh", "neg", "pos") and data.num_classes == 3
    assert data.input_shape == (2, 8)
    assert (data.train.num_examples, data.val.num_examples, data.test.num_examples) == (7, 3, 3)
    x, y = next(iter(data.test))
    # Longest first: "the bad movie ." (neg), "a plot" (meh), "good" (pos).
    assert y.tolist() == [1, 0, 2]
    assert x[2].tolist() == [[2, 6, 3, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]  # [CLS] good [SEP]
    _, val_y = next(iter(data.val))
    assert sorted(val_y.tolist()) == [0, 1, 2]  # stratified


def test_label_first_format_and_given_label_order(tmp_path: Path, tokenizer_dir: Path) -> None:
    _write(tmp_path / "train.tsv", TRAIN, label_first=True)
    _write(tmp_path / "test.tsv", TEST, label_first=True)
    data = load_data(_spec(tmp_path, tokenizer_dir, format="label-first", labels=["neg", "meh", "pos"]))
    assert data.class_names == ("neg", "meh", "pos")
    x, y = next(iter(data.test))
    assert y.tolist() == [0, 1, 2] and x[0, 1].sum() == 6  # "the bad movie ." is neg


def test_class_order_sorts_integer_labels_as_numbers() -> None:
    assert class_order(["10", "2", "2", "1"]) == ("1", "2", "10")
    assert class_order(["b", "10", "a"]) == ("10", "a", "b")


@pytest.mark.parametrize(
    ("test_rows", "kwargs", "message"),
    [
        ([("good", "great")], {}, r"test.tsv, line 1: label 'great' is not one of the classes \(meh, neg, pos\)"),
        ([("good", "pos")], {"labels": ["neg", "pos"]}, r"train.tsv, line 3: label 'meh' is not one of the classes"),
        ([("good", "")], {}, r"test.tsv, line 1: expected a sentence in column 1 and a label in column 0"),
        ([("good", "pos")], {"text_column": 5}, r"train.tsv, line 1: expected at least 6 tab-separated columns, got 3"),
        ([], {}, r"test.tsv: no examples \(data.kwargs.test is empty\)"),
        ([("good", "pos")], {"format": "csv"}, r"data set 'text-tsv': bad data.kwargs \(format: "),
    ],
)
def test_bad_labels_lines_and_options_name_the_file_and_line(
    files: Path, tokenizer_dir: Path, test_rows: list, kwargs: dict, message: str
) -> None:
    _write(files / "test.tsv", test_rows)
    _write(files / "train.tsv", TRAIN)
    with pytest.raises(DataError, match=message):
        load_data(_spec(files, tokenizer_dir, **kwargs))


def test_label_first_line_without_sentence(tmp_path: Path, tokenizer_dir: Path) -> None:
    _write(tmp_path / "train.tsv", TRAIN, label_first=True)
    (tmp_path / "test.tsv").write_text("pos good\nneg\n")
    with pytest.raises(DataError, match=r"test.tsv, line 2: expected 'LABEL sentence', got 'neg'"):
        load_data(_spec(tmp_path, tokenizer_dir, format="label-first"))


def test_missing_file_names_the_kwarg_and_path(files: Path, tokenizer_dir: Path) -> None:
    (files / "test.tsv").unlink()
    with pytest.raises(DataError, match=r"data.kwargs.test file not found: .*test.tsv"):
        load_data(_spec(files, tokenizer_dir))


def test_limit_train_keeps_validation_and_test(files: Path, tokenizer_dir: Path) -> None:
    spec = _spec(files, tokenizer_dir, header=True).model_copy(update={"limit_train": 2})
    data = load_data(spec)
    assert (data.train.num_examples, data.val.num_examples, data.test.num_examples) == (2, 3, 3)
    assert torch.is_tensor(next(iter(data.train))[0])
