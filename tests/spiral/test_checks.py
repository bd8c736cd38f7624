"""Recipes are checked before anything is trained: at parse time, or as soon as the model is built."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from rich.console import Console

from spiralkit.errors import RecipeError
from spiralkit.spiral.recipe import MAX_RECIPE_BYTES, load_recipe, parse_recipe
from spiralkit.spiral.runner import Spiral
from tests.spiral.tiny import TINY



def run_until_refused(text: str, run_dir: Path) -> str:
    """Run ``text``; return the error, checking that nothing was trained."""
    with pytest.raises(RecipeError) as caught:
        Spiral(parse_recipe(text, source="r.yaml")).run(run_dir, console=Console(quiet=True))
    assert not (run_dir / "baseline.safetensors").exists(), "refused before the baseline was trained"
    return str(caught.value)


@pytest.mark.parametrize("bits", [0, 33, 1])
def test_quantize_bits_out_of_range_fail_at_parse_naming_key_and_line(bits: int) -> None:
    with pytest.raises(RecipeError, match=rf"r\.yaml, line 15: key 'quantize\.bits': .*2.*8.* \(got {bits}\)"):
        parse_recipe(TINY + f"quantize:\n  kind: compact\n  bits: {bits}\n", source="r.yaml")


def test_quantize_bits_in_a_layer_map_are_checked_too() -> None:
    with pytest.raises(RecipeError, match=r"key 'quantize\.bits\.net\.0'|key 'quantize\.bits'"):
        parse_recipe(TINY + "quantize:\n  kind: compact\n  bits: {net.0: 9}\n", source="r.yaml")


def test_bits_for_an_unknown_layer_fail_before_training(tmp_path: Path) -> None:
    message = run_until_refused(TINY + "quantize:\n  kind: compact\n  bits: {fc9: 4}\n", tmp_path / "run")
    assert message.startswith("r.yaml, line 15: key 'quantize.bits': bits given for 'fc9'")


def test_a_quantize_exclude_matching_nothing_fails_before_training(tmp_path: Path) -> None:
    message = run_until_refused(TINY + "quantize:\n  kind: compact\n  exclude: [head*]\n", tmp_path / "run")
    assert message.startswith("r.yaml, line 15: key 'quantize.exclude': exclude pattern 'head*' matches no")


def test_an_int8_keep_float_matching_nothing_fails_before_training(tmp_path: Path) -> None:
    message = run_until_refused(TINY + "quantize:\n  kind: static-int8\n  keep_float: [head]\n", tmp_path / "run")
    assert message.startswith("r.yaml, line 15: key 'quantize.keep_float': pattern 'head' matches no module")


def test_a_prune_exclude_matching_nothing_fails_before_training(tmp_path: Path) -> None:
    text = TINY.replace("  target_sparsity: 0.5\n", "  target_sparsity: 0.5\n  exclude: [classifier]\n")
    message = run_until_refused(text, tmp_path / "run")
    assert message.startswith("r.yaml, line 9: key 'prune.0.exclude': selector pattern 'classifier' matches no")


def test_a_structured_exclude_matching_nothing_fails_before_training(tmp_path: Path) -> None:
    text = TINY.replace("  target_sparsity: 0.5\n", "  - kind: structured\n    target_reduction: 0.5\n    exclude: [head]\n")
    text = text.replace("  schedule: {kind: one-shot}\n", "")
    message = run_until_refused(text, tmp_path / "run")
    assert message.startswith("r.yaml, line 10: key 'prune.0.exclude':") and "'head'" in message


def test_zero_training_epochs_without_a_checkpoint_is_refused_at_parse() -> None:
    with pytest.raises(RecipeError, match="train.epochs is 0 and model 'mlp' has no checkpoint"):
        parse_recipe(TINY.replace("train: {epochs: 1,", "train: {epochs: 0,"))


def test_an_alias_bomb_is_refused_quickly() -> None:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        prev, name = chr(96 + i), chr(97 + i)
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    bomb = "\n".join(lines) + "\n"
    assert len(bomb) < 500
    started = time.perf_counter()
    with pytest.raises(RecipeError, match="more than 100,000 values once its aliases are expanded"):
        parse_recipe(bomb, source="bomb.yaml")
    assert time.perf_counter() - started < 2.0


def test_a_huge_recipe_is_refused() -> None:
    with pytest.raises(RecipeError, match="a recipe may have at most"):
        parse_recipe("#" * (MAX_RECIPE_BYTES + 1))


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmodel: [1, 2\ndata: 3\n")
    with pytest.raises(RecipeError, match=rf"{path}, line 3, column 5: not valid YAML") as caught:
        load_recipe(path)
    assert "<unicode string>" not in str(caught.value)


def test_a_recipe_path_that_is_a_directory_or_not_text_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=f"recipe {tmp_path} is a directory"):
        load_recipe(tmp_path)
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(b"\x80\x81\xff" * 10)
    with pytest.raises(RecipeError, match=f"recipe {binary} is not UTF-8 text"):
        load_recipe(binary)
