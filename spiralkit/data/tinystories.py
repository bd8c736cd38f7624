"""TinyStories as causal-language-model data: byte tokens, fixed-length windows, held-out stories.

The file ``<root>/tinystories/tinystories_val.txt`` holds ~4,300 children's stories (Eldan &
Li 2023) as paragraphs separated by blank lines (a few stories span two paragraphs; each
paragraph counts as a story here, and runs of whitespace inside one become a single space).
Stories are split whole, in file order, so no story is
in two splits: the last ``test_fraction`` of them is the test split (the held-out stories
perplexity is reported on), the ``val_fraction`` before those the validation split, the
rest the training split.

**Tokens are UTF-8 bytes** (vocabulary 256, `BYTE_VOCAB`): a tokenizer that needs no file,
no download and nothing stored beside the model, and that every model trained here shares.
Perplexity is then *per byte*, not per word or per BPE token; it is not comparable with
published TinyStories numbers.

Each split's stories are joined with a blank line (``"\\n\\n"``, as in the file, so the model
learns where a story ends) and cut into non-overlapping windows of ``seq_len + 1`` bytes:
the input is a window's first ``seq_len`` bytes and the target the same window shifted by
one (next-byte prediction), both ``int64`` of shape ``(seq_len,)``. A last partial window is
dropped.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from spiralkit.data.idx import read_checksums, read_data_file
from spiralkit.data.loaders import TensorLoader
from spiralkit.data.options import data_options
from spiralkit.data.spec import DataSpec, DataSplits
from spiralkit.errors import DataError

__all__ = [
    "BYTE_VOCAB",
    "STORIES_FILE",
    "TinyStoriesOptions",
    "decode_bytes",
    "encode_bytes",
    "load_tinystories",
    "next_token_windows",
    "read_stories",
    "split_stories",
]

BYTE_VOCAB = 256
STORIES_FILE = Path("tinystories") / "tinystories_val.txt"
_SEPARATOR = "\n\n"


class TinyStoriesOptions(BaseModel):
    """``data.kwargs`` of the ``tinystories`` data set.

    Attributes:
        seq_len: Bytes per input window (the target is the same window shifted by one).
        test_fraction: Share of the stories (the last ones in the file) held out as the test split.
        limit_stories: Read only the file's first stories (quick runs and tests); the
            fractions then apply to those.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    seq_len: int = Field(default=128, gt=0)
    test_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    limit_stories: int | None = Field(default=None, ge=3)


def read_stories(path: Path, *, root: Path) -> list[str]:
    """The stories of a TinyStories text file: paragraphs separated by blank lines, stripped.

    Raises:
        DataError: The file is missing or unreadable, differs from SHA256SUMS, is not UTF-8,
            or holds no story.
    """
    if not path.is_file():
        where = "" if root.is_dir() else f"data root {root} does not exist; "
        raise DataError(f"{where}TinyStories file not found: expected {path}. Set the recipe's `data.root` or "
                        "SPIRALKIT_DATA_DIR to the directory that contains tinystories/")
    raw = read_data_file(path, root=root, checksums=read_checksums(root))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    stories = [" ".join(block.split()) for block in text.replace("\r\n", "\n").split("\n\n")]
    stories = [story for story in stories if story]
    if not stories:
        raise DataError(f"{path}: holds no story (stories are paragraphs separated by blank lines)")
    return stories


def split_stories(stories: list[str], *, val_fraction: float, test_fraction: float) -> tuple[list[str], ...]:
    """``(train, val, test)``: the last ``test_fraction`` of the stories, the ``val_fraction`` before them, the rest.

    Each split gets at least one story.

    Raises:
        DataError: Fewer than 3 stories, or fractions that leave no training story.
    """
    n = len(stories)
    n_test = max(1, round(n * test_fraction))
    n_val = max(1, round(n * val_fraction))
    if n - n_test - n_val < 1:
        raise DataError(f"{n} stories cannot be split into train, validation ({val_fraction:g}) and test "
                        f"({test_fraction:g}) with a story in each")
    return stories[: n - n_test - n_val], stories[n - n_test - n_val : n - n_test], stories[n - n_test :]


def encode_bytes(text: str) -> Tensor:
    """UTF-8 bytes of ``text`` as ``int64`` token ids in ``[0, 256)``."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.int64)


def decode_bytes(tokens: Tensor) -> str:
    """Inverse of `encode_bytes` (invalid UTF-8 sequences become U+FFFD)."""
    return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


def next_token_windows(tokens: Tensor, seq_len: int, *, what: str = "text") -> tuple[Tensor, Tensor]:
    """Non-overlapping next-token windows: inputs ``tokens[i·L : i·L + L]``, targets shifted by one.

    Args:
        tokens: 1-D token ids.
        seq_len: ``L``, tokens per window.
        what: Names the text in the error message.

    Returns:
        ``(inputs, targets)``, each ``(n, L)`` with ``n = (len(tokens) − 1) // L``.

    Raises:
        DataError: Fewer than ``L + 1`` tokens.
    """
    n = (tokens.numel() - 1) // seq_len
    if n < 1:
        raise DataError(f"{what}: {tokens.numel()} tokens cannot fill one window of seq_len={seq_len} (+1 target)")
    inputs = tokens[: n * seq_len].reshape(n, seq_len)
    targets = tokens[1 : n * seq_len + 1].reshape(n, seq_len)
    return inputs.contiguous(), targets.contiguous()


def load_tinystories(spec: DataSpec, seed: int) -> DataSplits:
    """The ``tinystories`` data set (see the module docstring); ``data.kwargs`` are `TinyStoriesOptions`.

    ``limit_train`` keeps the first training windows. ``num_classes`` is None: the targets
    are next tokens (vocabulary `BYTE_VOCAB`), not classes.

    Raises:
        DataError: No data directory, a missing or corrupt file, bad ``data.kwargs``, or too
            little text for one window in a split.
    """
    options = data_options(TinyStoriesOptions, spec.kwargs, name=spec.name)
    root = _data_root(spec)
    stories = read_stories(root / STORIES_FILE, root=root)[: options.limit_stories]
    splits = split_stories(stories, val_fraction=spec.val_fraction, test_fraction=options.test_fraction)
    windows = [
        next_token_windows(encode_bytes(_SEPARATOR.join(part)), options.seq_len, what=f"tinystories {name} split")
        for name, part in zip(("train", "validation", "test"), splits, strict=True)
    ]
    (train_x, train_y), val, test = windows
    return DataSplits(
        name=spec.name,
        train=TensorLoader(train_x[: spec.limit_train], train_y[: spec.limit_train], batch_size=spec.batch_size,
                           shuffle=True, seed=seed),
        val=TensorLoader(*val, batch_size=spec.eval_batch_size, shuffle=False),
        test=TensorLoader(*test, batch_size=spec.eval_batch_size, shuffle=False),
        input_shape=(options.seq_len,),
        num_classes=None,
    )


def _data_root(spec: DataSpec) -> Path:
    # Deferred: spiralkit.data.sources imports this module for its table of data sets.
    from spiralkit.data.sources import _data_root as data_root

    return data_root(spec)
