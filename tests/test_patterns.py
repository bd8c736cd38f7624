"""Name patterns shared by every recipe option that picks layers or parameters."""

from __future__ import annotations

from spiralkit.patterns import first_unmatched, matches_any


def test_matches_any_is_case_sensitive_fnmatch() -> None:
    assert matches_any("layer1.0.conv1", ["fc*", "layer1.*"])
    assert not matches_any("Layer1.0.conv1", ["layer1.*"])
    assert not matches_any("fc", [])


def test_first_unmatched_names_the_first_pattern_that_matches_nothing() -> None:
    names = (name for name in ["conv1", "fc1", "fc2"])  # any iterable, read once
    assert first_unmatched(["fc?", "conv9", "head", "conv*"], names) == "conv9"
    assert first_unmatched(["fc?", "conv*"], ["conv1", "fc1"]) is None
    assert first_unmatched(["*"], []) == "*"
