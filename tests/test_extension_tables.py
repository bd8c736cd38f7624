"""Extension tables: a new criterion or loss term is one class and one table line.

Each toy below is defined here, added to its table by the ``added`` fixture (which puts the
table back as it found it), named in a recipe, and run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Annotated, Any, Literal

import pydantic
import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from spiralkit.configs import KindTable, by_kind
from spiralkit.distill import LOSS_TERMS, LogitsTerm, Tap, Term, TermBatch, kd_loss
from spiralkit.modules import freeze
from spiralkit.spiral.recovery import Distill
from spiralkit.distill.taps import TapSpec
from spiralkit.errors import RecipeError
from spiralkit.graph.groups import ModelGroups
from spiralkit.models import mlp
from spiralkit.prune import (
    CHANNEL_CRITERIA,
    WEIGHT_CRITERIA,
    Magnitude,
    StructureScores,
    UnstructuredPrune,
    prune,
    score_weights,
)
from spiralkit.prune.structured import StructuredPrune, plan_pruning
from spiralkit.spiral.recipe import Recipe, dump_recipe, parse_recipe
from spiralkit.tasks import Classification

RECIPE = """\
model: {name: mlp, kwargs: {in_features: 4, widths: [5], num_classes: 3}}
data: {name: digits}
"""


def _mlp() -> nn.Module:
    return mlp(in_features=4, widths=[5], num_classes=3)


# --------------------------------------------------------------------------- the toys: one class each


class Largest(BaseModel):
    """Prune the largest weights first: ``−|w|^power``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["largest"] = "largest"
    power: float = 1.0

    def weight_scores(self, *, model: nn.Module, weights: Mapping[str, nn.Parameter],
                      batches: Iterable[tuple[Tensor, Tensor]], loss_fn: Any) -> dict[str, Tensor]:
        return {name: -w.detach().abs().pow(self.power) for name, w in weights.items()}


class LastChannels(BaseModel):
    """Keep the channels with the highest indices (a structured criterion)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["last_channels"] = "last_channels"

    def structure_scores(self, *, model: nn.Module, groups: ModelGroups, inputs: Sequence[Any],
                         batches: Iterable[tuple[Any, Tensor]], loss_fn: Any) -> StructureScores:
        channels = {g.id: torch.arange(g.size, dtype=torch.float64) for g in groups.channels}
        return StructureScores(channels=channels, heads={})


class MeanGapTerm(Term):
    """``|mean(s) − mean(t)|`` between two tapped features."""

    kind: Literal["mean_gap"] = "mean_gap"
    student: TapSpec
    teacher: TapSpec

    def tap_pairs(self) -> list[tuple[Tap, Tap]]:
        return [(self.student, self.teacher)]

    def compute(self, batch: TermBatch, learned: nn.Module | None, *, alpha: float, temperature: float) -> Tensor:
        s, t = batch.pair(self.student, self.teacher)
        return (s.mean() - t.mean()).abs()


@contextmanager
def _added(table: dict[str, Any], cls: type[BaseModel]) -> Iterator[None]:
    """``cls`` in ``table`` (the one table line) for the duration; the table is then as it was."""
    before = dict(table)
    table.update(by_kind(cls))
    try:
        yield
    finally:
        table.clear()
        table.update(before)


@pytest.fixture
def added() -> Iterator[Callable[[dict[str, Any], type[BaseModel]], None]]:
    """``added(table, cls)`` adds a class to a table until the test ends."""
    with ExitStack() as stack:
        yield lambda table, cls: stack.enter_context(_added(table, cls))


def test_added_restores_the_table_as_found() -> None:
    before = list(WEIGHT_CRITERIA.items())
    with _added(WEIGHT_CRITERIA, Largest):
        assert list(WEIGHT_CRITERIA)[-1] == "largest"
    assert list(WEIGHT_CRITERIA.items()) == before


@pytest.mark.parametrize("table", [WEIGHT_CRITERIA, CHANNEL_CRITERIA, LOSS_TERMS], ids=["weight", "channel", "loss"])
def test_tables_hold_only_the_built_ins_between_tests(table: dict[str, Any]) -> None:
    assert not {"largest", "last_channels", "mean_gap"} & set(table), "a test left a toy in a table"


# --------------------------------------------------------------------------- used from a recipe


def test_a_new_weight_criterion_is_one_class_and_one_line(added: Callable[..., None]) -> None:
    added(WEIGHT_CRITERIA, Largest)
    recipe = parse_recipe(RECIPE + "prune: {criterion: {kind: largest, power: 2}, target_sparsity: 0.5}\n")
    (stage,) = recipe.prune
    assert isinstance(stage, UnstructuredPrune) and stage.criterion == Largest(power=2)
    assert parse_recipe(dump_recipe(recipe)) == recipe

    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -4.0, 2.0], [-3.0, 0.5, 6.0]]))
    scores = score_weights(stage.criterion, model=model, weights={"0.weight": model[0].weight})
    assert torch.equal(scores["0.weight"], -model[0].weight.detach().square())
    prune(model, stage)
    assert torch.equal(model[0].weight, torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.5, 0.0]])), "the largest half goes"


def test_a_new_channel_criterion_is_one_class_and_one_line(added: Callable[..., None]) -> None:
    added(CHANNEL_CRITERIA, LastChannels)
    config = StructuredPrune.model_validate({"criterion": "last_channels", "ratio": 0.4})
    assert isinstance(config.criterion, LastChannels)
    torch.manual_seed(0)
    plan = plan_pruning(_mlp().eval(), config, example=torch.randn(2, 4))
    (group,) = plan.groups
    assert group.keep == (2, 3, 4)


def test_a_new_loss_term_is_one_class_and_one_line(added: Callable[..., None]) -> None:
    added(LOSS_TERMS, MeanGapTerm)
    recipe = parse_recipe(RECIPE + "recover:\n  kind: distill\n"
                          "  losses: [logits, {kind: mean_gap, student: fc1, teacher: fc1, weight: 2}]\n")
    config = recipe.recover
    assert isinstance(config, Distill)
    assert config.losses == (LogitsTerm(), MeanGapTerm(student=Tap(module="fc1"), teacher=Tap(module="fc1"), weight=2))
    assert parse_recipe(dump_recipe(recipe)) == recipe

    torch.manual_seed(0)
    teacher, student = freeze(_mlp()), _mlp()
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    objective = config.objective(task=Classification(), teacher=teacher)
    expected = (kd_loss(student(x), teacher(x), y, alpha=config.alpha, temperature=config.temperature)
                + 2 * (student.fc1(x).mean() - teacher.fc1(x).mean()).abs())
    assert objective(student, x, y).item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(objective.last_terms) == {"0:logits", "1:mean_gap"}  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("section", "known"),
    [
        ("prune: {criterion: nope, target_sparsity: 0.5}", "'magnitude', 'random', 'taylor', 'wanda', 'sparsegpt'"),
        ("prune: {kind: structured, criterion: nope, target_reduction: 0.5}",
         "'magnitude', 'taylor', 'mean_activation', 'apoz', 'bn_scale', 'norm_ratio', 'random'"),
        ("recover: {kind: distill, losses: [{kind: nope}]}",
         "'logits', 'hint', 'attention_transfer', 'attention_probs', 'crd', 'layers', 'outputs'"),
    ],
    ids=["weight-criterion", "channel-criterion", "loss-term"],
)
def test_an_unknown_kind_names_the_known_kinds(section: str, known: str) -> None:
    with pytest.raises(RecipeError, match=r"line 3: key '[a-z.0-9]+': Input tag 'nope' found using 'kind' does not "
                                          rf"match any of the expected tags: {known} \(got"):
        parse_recipe(RECIPE + section + "\n")


def test_the_known_kinds_are_read_when_a_recipe_is_validated(added: Callable[..., None]) -> None:
    added(LOSS_TERMS, MeanGapTerm)
    with pytest.raises(RecipeError, match=r"expected tags: 'logits', .*'outputs', 'mean_gap'"):
        parse_recipe(RECIPE + "recover: {kind: distill, losses: [{kind: nope}]}\n")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("prune:\n  criterion: {kind: magnitude, nrom: 2}\n  target_sparsity: 0.5",
         r"line 4: unknown key 'prune.criterion.nrom' \(did you mean 'norm'\?\)"),
        ("prune:\n  kind: structured\n  target_reduction: 0.5\n  criterion: {kind: apoz, bathces: 2}",
         r"line 6: unknown key 'prune.criterion.bathces' \(did you mean 'batches'\?\)"),
        ("recover:\n  kind: distill\n  losses:\n    - logits\n"
         "    - {kind: hint, student: fc1, teacher: fc1, wieght: 2}",
         r"line 7: unknown key 'recover.losses.1.wieght' \(did you mean 'weight'\?\)"),
    ],
    ids=["weight-criterion", "channel-criterion", "loss-term"],
)
def test_a_bad_key_in_a_table_entry_names_path_line_and_hint(section: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        parse_recipe(RECIPE + section + "\n")


def test_a_bad_key_in_an_added_class_is_hinted_too(added: Callable[..., None]) -> None:
    added(LOSS_TERMS, MeanGapTerm)
    message = r"line 3: unknown key 'recover.losses.0.studnet' \(did you mean 'student'\?\)"
    with pytest.raises(RecipeError, match=message):
        parse_recipe(RECIPE + "recover: {kind: distill, losses: [{kind: mean_gap, studnet: fc1, teacher: fc1}]}\n")


# --------------------------------------------------------------------------- the table type itself


class _A(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["a"] = "a"
    x: int = 1


class _B(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["b"] = "b"


_TABLE = by_kind(_A, _B)


class _Holder(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    one: Annotated[BaseModel, KindTable(_TABLE, what="toy", default="a")] = _A()
    strict: Annotated[BaseModel, KindTable(_TABLE, what="toy")] = _B()


def test_kind_table_values_instances_names_and_defaults() -> None:
    instance = _A(x=3)
    assert _Holder(one=instance).one is instance, "instances of table classes pass through"
    assert _Holder.model_validate({"one": {"x": 2}}).one == _A(x=2), "a missing kind is the default"
    assert _Holder.model_validate({"one": "b"}).one == _B(), "a kind's name alone"
    holder = _Holder.model_validate({"one": {"x": 5}, "strict": {"kind": "a"}})
    assert holder.model_dump(mode="json") == {"one": {"kind": "a", "x": 5}, "strict": {"kind": "a", "x": 1}}
    assert _Holder.model_validate(holder.model_dump(mode="json")) == holder


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"strict": {"x": 2}}, "Unable to extract tag using discriminator 'kind'"),
        ({"one": 3}, "Input should be a toy: a mapping with a kind, or a kind's name"),
        ({"one": {"kind": "c"}}, "Input tag 'c' found using 'kind' does not match any of the expected tags: 'a', 'b'"),
        ({"one": {"kind": "a", "y": 1}}, "Extra inputs are not permitted"),
    ],
    ids=["no-kind-no-default", "not-a-mapping", "unknown", "nested"],
)
def test_kind_table_errors(value: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        _Holder.model_validate(value)


def test_by_kind_rejects_shared_or_missing_kinds() -> None:
    class NoKind(BaseModel):
        x: int = 0

    with pytest.raises(TypeError, match="share the kind 'a'"):
        by_kind(_A, _A)
    with pytest.raises(TypeError, match="NoKind has no default kind"):
        by_kind(NoKind)


def test_a_table_typed_field_stays_a_magnitude_default_and_in_the_schema() -> None:
    assert UnstructuredPrune(target_sparsity=0.5).criterion == Magnitude()
    schema = str(Recipe.model_json_schema())
    assert "MeanActivation" in schema and "HintTerm" in schema
