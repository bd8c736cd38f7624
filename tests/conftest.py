"""Suite-wide fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import os
import tempfile

import pytest
import torch

# Hypothesis keeps caches in this directory: outside the source tree (see no_files_left_behind).
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "spiralkit-hypothesis"))
from hypothesis import HealthCheck, settings  # noqa: E402 - after the storage directory is set

ROOT = Path(__file__).resolve().parents[1]
# Property tests: no example database in the source tree, no per-example deadline (a loaded
# CI machine is slow), a bounded number of examples per test.
settings.register_profile("spiralkit", database=None, deadline=None, max_examples=150,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("spiralkit")
# The offline data sets beside the project (see the README); `make test` sets the same.
os.environ.setdefault("SPIRALKIT_DATA_DIR", str(ROOT.parent / "shared" / "data"))


def _tree() -> set[Path]:
    ignored = {".venv", ".git", ".pytest_cache", "runs"}
    return {
        p for p in ROOT.rglob("*")
        if not any(part in ignored or part == "__pycache__" or part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)
    }


@pytest.fixture(autouse=True, scope="session")
def no_files_left_behind() -> Iterator[None]:
    """Fail the run when a test leaves files in the source tree (tests write under tmp_path)."""
    before = _tree()
    yield
    left = sorted(str(p.relative_to(ROOT)) for p in _tree() - before)
    assert not left, f"tests left files behind: {left[:10]}"


@pytest.fixture(autouse=True, scope="session")
def one_thread() -> Iterator[None]:
    """One intra-op thread for the whole suite: tiny models, and a CI machine of two cores.

    Tests that care about threads set and restore their own (the runner, latency).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
