"""GLUE SST-2 (binary sentiment): reading its TSV files and tokenising them for text models.

Files live at ``<root>/sst2/train.tsv`` and ``<root>/sst2/dev.tsv``, one
``sentence<TAB>label`` per line (label 0 = negative, 1 = positive) after an optional
``sentence<TAB>label`` header, as GLUE ships them (67,349 and 872 sentences). GLUE's test
split has no labels, so the dev file is the reported test split and validation is carved
from the training file (see `spiralkit.data.sources`).

Sentences are tokenised by a Hugging Face tokenizer in one batched call and packed as the
``(N, 2, max_length)`` int64 ids-and-mask tensors that `spiralkit.models.hf.HFTextModel`
takes; the fast (Rust) tokenizer does all 67k training sentences in a few seconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from spiralkit.data.idx import read_data_file
from spiralkit.data.options import data_options
from spiralkit.errors import DataError, ModelError

__all__ = [
    "SST2_DIR",
    "UNLABELED",
    "SST2Options",
    "TokenizerOptions",
    "encode_sentences",
    "find_sst2_files",
    "read_sst2",
    "splice_sentences",
    "sst2_options",
]

SST2_DIR = "sst2"
_FILES = (("train", "train.tsv"), ("dev", "dev.tsv"))
_HEADER = ("sentence", "label")
_LABELS = {"0": 0, "1": 1}
UNLABELED = -1
"""The label of a spliced sentence (`splice_sentences`): it has none."""


class TokenizerOptions(BaseModel):
    """How the sentences of a text data set (``sst2``, ``text-tsv``) are tokenised.

    Attributes:
        tokenizer: A packaged model alias (``minilm-l6``) or a local Hugging Face directory
            whose tokenizer to use; it must match the model's.
        max_length: Tokens per sentence, special tokens included; longer sentences are
            truncated, shorter ones padded (the model skips all-padding columns per batch).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokenizer: str = Field(default="minilm-l6", min_length=1)
    max_length: int = Field(default=64, ge=2, le=512)


class SST2Options(TokenizerOptions):
    """The ``data.kwargs`` of the ``sst2`` data set: `TokenizerOptions` and ``splice``.

    Attributes:
        splice: Add ``splice`` × (training sentences) unlabeled sentences to the training
            split, each made by `splice_sentences` from two training sentences. They carry
            the label `UNLABELED`, so only a task trained on a teacher's outputs (``task:
            fidelity``) can use them; the recipe checks this. Validation and test are unchanged.
    """

    splice: int = Field(default=0, ge=0, le=16)


def sst2_options(kwargs: Mapping[str, Any]) -> SST2Options:
    """Validate ``data.kwargs`` for ``sst2``.

    Raises:
        DataError: An unknown key or a bad value, named in the message.
    """
    return data_options(SST2Options, kwargs, name="sst2")


def find_sst2_files(root: Path) -> dict[str, Path]:
    """``{"train": path, "dev": path}`` under ``<root>/sst2/``.

    Raises:
        DataError: A file is missing; the message names every missing path.
    """
    paths = {split: root / SST2_DIR / name for split, name in _FILES}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        where = "" if root.is_dir() else f"data root {root} does not exist; "
        raise DataError(
            f"{where}SST-2 file(s) not found: {'; '.join(missing)}. Set the recipe's `data.root` or "
            "SPIRALKIT_DATA_DIR to the directory that contains sst2/"
        )
    return paths


def read_sst2(path: Path, *, root: Path, checksums: Mapping[str, str]) -> tuple[list[str], np.ndarray]:
    """Read one SST-2 TSV file (verified against SHA256SUMS when listed there).

    Args:
        path: The file.
        root: The data root that SHA256SUMS paths are relative to.
        checksums: From `spiralkit.data.idx.read_checksums`.

    Returns:
        The sentences (surrounding whitespace stripped) and their int64 labels.

    Raises:
        DataError: The file is unreadable, corrupt, not UTF-8, has a malformed line or a
            label other than 0/1, or holds no example; the message names the file and line.
    """
    raw = read_data_file(path, root=root, checksums=checksums)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text: {exc}") from None
    sentences: list[str] = []
    labels: list[int] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or (number == 1 and tuple(line.strip().lower().split("\t")) == _HEADER):
            continue
        sentence, tab, label = line.rpartition("\t")
        if not tab or not sentence.strip():
            raise DataError(f"{path}, line {number}: expected 'sentence<TAB>label', got {line[:80]!r}")
        if label.strip() not in _LABELS:
            raise DataError(f"{path}, line {number}: label must be 0 or 1, got {label.strip()!r}")
        sentences.append(sentence.strip())
        labels.append(_LABELS[label.strip()])
    if not sentences:
        raise DataError(f"{path}: no examples (expected 'sentence<TAB>label' lines)")
    return sentences, np.asarray(labels, dtype=np.int64)


def splice_sentences(sentences: Sequence[str], count: int, *, seed: int) -> list[str]:
    """``count`` new sentences, each the start of one sentence joined to the end of another.

    For a random pair ``(a, b)`` (words split on whitespace) and random cut points, the new
    sentence is ``a[:i] + b[j:]`` with both parts non-empty. Distilling a sentence encoder on
    unlabeled text needs only the teacher's outputs, and these new word sequences widen what
    the student sees beyond the training sentences themselves (on SST-2, whose 67k training
    entries are phrases of about 8.5k reviews, they raise the student's fidelity on the unseen
    dev sentences; see docs/results.md).

    Args:
        sentences: Source sentences (at least one).
        count: How many to make.
        seed: Seeds numpy's generator: the same arguments give the same sentences.
    """
    rng = np.random.default_rng(seed)
    words = [sentence.split() for sentence in sentences]
    pairs = rng.integers(len(words), size=(count, 2))
    cuts = rng.random((count, 2))
    made = []
    for (first, second), (cut_first, cut_second) in zip(pairs, cuts, strict=True):
        head, tail = words[first], words[second]
        start = head[: 1 + int(cut_first * len(head))]
        end = tail[int(cut_second * len(tail)) :]
        made.append(" ".join(start + end))
    return made


def encode_sentences(sentences: Sequence[str], options: TokenizerOptions, *, name: str) -> Tensor:
    """Tokenise sentences with the options' tokenizer into ``(N, 2, max_length)`` int64.

    Args:
        sentences: The sentences, in the order of the rows returned.
        options: Which tokenizer and how many tokens per sentence.
        name: The data set, named in the error message.

    Raises:
        DataError: The tokenizer cannot be loaded.
    """
    from spiralkit.models.hf import encode_texts, load_tokenizer  # deferred: imports transformers

    try:
        tokenizer = load_tokenizer(options.tokenizer)
    except ModelError as exc:
        raise DataError(f"data set {name!r}: data.kwargs.tokenizer {options.tokenizer!r}: {exc}") from None
    return encode_texts(tokenizer, sentences, max_length=options.max_length)
