"""Recipes: valid ones load; every mistake names the key and its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from spiralkit.errors import RecipeError
from spiralkit.prune import AGP, Taylor
from spiralkit.prune import UnstructuredPrune
from spiralkit.spiral.prune import StructuredStage
from spiralkit.spiral.recipe import dump_recipe, load_recipe, parse_recipe
from spiralkit.spiral.recovery import Distill, Finetune

ROOT = Path(__file__).resolve().parents[2]

GOOD = """\
name: t
model:
  name: mlp
  kwargs: {in_features: 64, widths: [32]}
data:
  name: digits
prune:
  target_sparsity: 0.5
  criterion: taylor
recover:
  kind: finetune
  train:
    epochs: 2
"""


def test_good_recipe_loads_with_types() -> None:
    recipe = parse_recipe(GOOD)
    (stage,) = recipe.prune  # one mapping is one unstructured stage
    assert isinstance(stage, UnstructuredPrune) and isinstance(stage.criterion, Taylor)
    assert isinstance(stage.schedule, AGP)
    assert isinstance(recipe.recover, Finetune) and recipe.recover.train.epochs == 2
    assert parse_recipe(dump_recipe(recipe)) == recipe, "a dumped recipe loads back identical"


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path: Path) -> None:
    load_recipe(path)


def test_demo_recipe_is_distillation() -> None:
    assert isinstance(load_recipe(ROOT / "recipes" / "demo.yaml").recover, Distill)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD.replace("  target_sparsity: 0.5", "  target_sparsty: 0.5"),
         r"line 8: unknown key 'prune.target_sparsty' \(did you mean 'target_sparsity'\?\)"),
        (GOOD.replace("    epochs: 2", "    epochz: 2"),
         r"line 13: unknown key 'recover.train.epochz' \(did you mean 'epochs'\?\)"),
        (GOOD.replace("  target_sparsity: 0.5", "  target_sparsity: 1.5"),
         r"line 8: key 'prune.target_sparsity': Input should be less than 1"),
        (GOOD.replace("    epochs: 2", "    epochs: two"), r"line 13: key 'recover.train.epochs'"),
        (GOOD.replace("  criterion: taylor", "  criterion: tailor"), r"line 9: key 'prune.criterion'"),
        (GOOD.replace("data:\n  name: digits\n", ""), r"missing required key 'data'"),
        (GOOD + "model: {name: x}\n", r"line 14: duplicate key 'model' \(first on line 2\)"),
        ("- a\n- b\n", "a recipe must be a mapping"),
        ("name: [unclosed\n", "not valid YAML"),
    ],
    ids=["typo", "nested-typo", "range", "type", "union-tag", "missing", "duplicate", "list", "yaml"],
)
def test_recipe_errors_name_the_key_and_line(text: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        parse_recipe(text, source="r.yaml")


def test_missing_recipe_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe file not found: .*nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")


def test_yaml_tags_are_not_executed() -> None:
    with pytest.raises(RecipeError, match="not valid YAML"):
        parse_recipe("name: !!python/object/apply:os.system ['true']\n")


HYBRID = """\
model: {name: lenet5}
data: {name: digits}
prune:
  - {kind: structured, measure: macs, target_reduction: 0.6, round_to: 4}
  - {target_sparsity: 0.5}
"""


def test_spliced_unlabeled_sentences_are_accepted_for_the_fidelity_task() -> None:
    recipe = parse_recipe("model: {name: 'hf:minilm-l6'}\ndata: {name: sst2, kwargs: {splice: 1}}\ntask: fidelity\n")
    assert recipe.data.kwargs == {"splice": 1}


def test_hybrid_recipe_is_a_list_of_stages_structured_first() -> None:
    structured, unstructured = parse_recipe(HYBRID).prune
    assert isinstance(structured, StructuredStage) and structured.target_reduction == 0.6
    assert structured.step(0.25).round_to == 4 and structured.step(0.25).ratio == 0.25
    assert isinstance(unstructured, UnstructuredPrune) and unstructured.target_sparsity == 0.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (HYBRID.replace("- {kind: structured, measure: macs, target_reduction: 0.6, round_to: 4}\n  - {target_sparsity: 0.5}",
                        "- {target_sparsity: 0.5}\n  - {kind: structured, target_reduction: 0.6}"),
         r"prune stage 2 is structured but follows an unstructured stage"),
        (HYBRID.replace("measure: macs", "measure: flops"),
         r"line 4: key 'prune.0.measure': Input should be 'macs', 'params' or 'latency'"),
        (HYBRID.replace("target_reduction: 0.6", "target_reduktion: 0.6"),
         r"line 4: unknown key 'prune.0.target_reduktion'"),
        (HYBRID + "quantize: {kind: compact, bits: 8}\n",
         r"quantize kind 'compact' cannot follow structured pruning yet"),
        ("model: {name: 'hf:minilm-l6'}\ndata: {name: sst2, kwargs: {splice: 1}}\n",
         r"data.kwargs.splice adds unlabeled sentences, which only task 'fidelity' trains on \(this recipe's "
         r"task is 'classification'\)"),
    ],
)
def test_bad_stages_are_named(text: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        parse_recipe(text)


def test_recovery_precision_is_read_and_a_wrong_one_is_named() -> None:
    recipe = parse_recipe(HYBRID + "recover: {kind: distill, train: {epochs: 1, precision: bf16}}\n")
    assert recipe.recover.train.precision == "bf16"
    with pytest.raises(RecipeError, match=r"line 6: key 'recover.train.precision': Input should be 'fp32', 'bf16' or 'auto'"):
        parse_recipe(HYBRID + "recover: {kind: distill, train: {epochs: 1, precision: fp16}}\n")
