"""Sentence classification from text files: ``text-tsv``.

Each non-empty line is one example, either tab-separated columns holding the sentence and
its label (``format: tsv``) or ``LABEL sentence`` (``format: label-first``, the label up to
the first space, as fastText writes ``__label__pos great film``). Labels are any strings;
class ``i`` is the ``i``-th of ``labels`` when given, else of the distinct training labels
sorted (numerically when they are all integers). Sentences are tokenised like ``sst2``'s
(`spiralkit.data.sst2.encode_sentences`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from spiralkit.data.sst2 import TokenizerOptions
from spiralkit.errors import DataError

__all__ = ["LabelledText", "TextTSVOptions", "class_order", "read_labelled_text"]


class TextTSVOptions(TokenizerOptions):
    """The ``data.kwargs`` of ``text-tsv``: `TokenizerOptions` and the files' format.

    Attributes:
        train: The training file; validation is carved from it.
        test: The test file (only reported).
        format: ``tsv`` (columns split by tabs) or ``label-first`` (``LABEL sentence``).
        text_column: Column of the sentence (``tsv``), from 0.
        label_column: Column of the label (``tsv``), from 0.
        header: The first line of each file is a header, skipped.
        labels: The class names in index order; every label must be one of them. Default:
            the distinct training labels, sorted.
    """

    train: Path
    test: Path
    format: Literal["tsv", "label-first"] = "tsv"
    text_column: int = Field(default=0, ge=0)
    label_column: int = Field(default=1, ge=0)
    header: bool = False
    labels: tuple[str, ...] | None = Field(default=None, min_length=2)


@dataclass(frozen=True)
class LabelledText:
    """The examples of one file: sentences, their labels as written, and their line numbers."""

    path: Path
    sentences: list[str]
    labels: list[str]
    lines: list[int]

    def indices(self, class_names: Sequence[str]) -> np.ndarray:
        """int64 class indices of the labels.

        Raises:
            DataError: A label is not one of ``class_names``; the message names file and line.
        """
        index = {name: i for i, name in enumerate(class_names)}
        for label, line in zip(self.labels, self.lines, strict=True):
            if label not in index:
                raise DataError(
                    f"{self.path}, line {line}: label {label!r} is not one of the classes "
                    f"({', '.join(class_names)})"
                )
        return np.asarray([index[label] for label in self.labels], dtype=np.int64)


def read_labelled_text(path: Path, options: TextTSVOptions, *, role: str) -> LabelledText:
    """Read one file of labelled sentences.

    Args:
        path: The file.
        options: Its format.
        role: ``train`` or ``test``: the kwarg that named the file, for messages.

    Raises:
        DataError: The file is missing, unreadable, not UTF-8, has a line without a
            sentence or a label, or has no example; the message names the file and line.
    """
    if not path.is_file():
        raise DataError(f"data set 'text-tsv': data.kwargs.{role} file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 text: {exc}") from None
    sentences: list[str] = []
    labels: list[str] = []
    lines: list[int] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or (options.header and number == 1):
            continue
        sentence, label = _split_line(line, options, where=f"{path}, line {number}")
        sentences.append(sentence)
        labels.append(label)
        lines.append(number)
    if not sentences:
        raise DataError(f"{path}: no examples (data.kwargs.{role} is empty)")
    return LabelledText(path=path, sentences=sentences, labels=labels, lines=lines)


def class_order(labels: Sequence[str]) -> tuple[str, ...]:
    """The distinct labels sorted: as numbers when they are all integers, else as strings."""
    distinct = set(labels)
    if all(_is_int(label) for label in distinct):
        return tuple(sorted(distinct, key=int))
    return tuple(sorted(distinct))


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _split_line(line: str, options: TextTSVOptions, *, where: str) -> tuple[str, str]:
    if options.format == "label-first":
        label, _, sentence = line.strip().partition(" ")
        expected = "'LABEL sentence'"
    else:
        fields = line.split("\t")
        needed = max(options.text_column, options.label_column) + 1
        if len(fields) < needed:
            raise DataError(f"{where}: expected at least {needed} tab-separated columns, got {len(fields)}: {line[:80]!r}")
        sentence, label = fields[options.text_column], fields[options.label_column]
        expected = f"a sentence in column {options.text_column} and a label in column {options.label_column}"
    if not sentence.strip() or not label.strip():
        raise DataError(f"{where}: expected {expected}, got {line[:80]!r}")
    return sentence.strip(), label.strip()
