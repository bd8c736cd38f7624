"""Property-based fuzzing of the recipe parser: any input gives a recipe or a `RecipeError`, quickly."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from hypothesis import given
from hypothesis import strategies as st

from spiralkit.errors import RecipeError
from spiralkit.spiral.recipe import Recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "recipes").glob("*.yaml"))]


def _all_keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        return {str(k) for k in value} | {k for v in value.values() for k in _all_keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _all_keys(v)}
    return set()


KEYS = sorted({key for recipe in SHIPPED for key in _all_keys(recipe)})
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(KEYS))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=4)),
                      max_leaves=20)


def _parse(text: str) -> None:
    started = time.perf_counter()
    try:
        assert isinstance(parse_recipe(text, source="fuzz.yaml"), Recipe)
    except RecipeError as exc:
        assert str(exc), "every error says something"
    assert time.perf_counter() - started < 5.0


@given(st.text(max_size=400))
def test_any_text(text: str) -> None:
    _parse(text)


@given(st.sampled_from(SHIPPED), st.data())
def test_a_shipped_recipe_with_one_value_replaced(recipe: dict[str, Any], data: st.DataObject) -> None:
    mutated = yaml.safe_load(yaml.safe_dump(recipe))
    node: Any = mutated
    while True:  # walk down to a random mapping or list, then replace one of its values
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = data.draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and data.draw(st.booleans()):
            node = child
            continue
        node[key] = data.draw(values)
        break
    _parse(yaml.safe_dump(mutated, sort_keys=False))


@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=8))
def test_any_mapping_of_known_keys(document: dict[str, Any]) -> None:
    _parse(yaml.safe_dump(document))


@given(st.sampled_from(SHIPPED), st.integers(0, 2000), st.text(max_size=5))
def test_a_shipped_recipe_with_text_spliced_in(recipe: dict[str, Any], at: int, junk: str) -> None:
    text = yaml.safe_dump(recipe, sort_keys=False)
    _parse(text[:at] + junk + text[at:])
