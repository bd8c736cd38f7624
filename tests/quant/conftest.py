"""Fixtures shared by the quantization tests."""

from __future__ import annotations

import pytest

from spiralkit.data import DataSpec, DataSplits, load_data


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    """scikit-learn's digits (1x8x8), the quick real data set of these tests."""
    return load_data(DataSpec(name="digits", batch_size=64, eval_batch_size=500), seed=0)
