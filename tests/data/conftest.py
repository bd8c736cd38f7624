"""Fixtures of the data tests."""

from __future__ import annotations

from pathlib import Path

import pytest

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "bad", "movie", "the", "plot", "."]
"""The vocabulary of `tokenizer_dir`: ids 0..11 in this order."""


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny word-level BERT tokenizer saved in a directory (text data sets take its path)."""
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("tokenizer")
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(directory)
    return directory
