"""The distillation objective: recipe configs, weighted terms, learned adapters, schedules, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spiralkit.data import TensorLoader
from spiralkit.distill import (
    AttentionProbsTerm,
    AttentionTransferTerm,
    CRDTerm,
    DistillError,
    DistillObjective,
    HintTerm,
    LayersTerm,
    LogitsTerm,
    OutputsTerm,
    TemperatureSchedule,
    Tap,
    attention_probs_loss,
    kd_loss,
    value_relation_loss,
)
from spiralkit.errors import RecipeError
from spiralkit.models import mlp
from spiralkit.modules import freeze
from spiralkit.spiral.recipe import dump_recipe, parse_recipe
from spiralkit.spiral.recovery import Distill, distill
from spiralkit.tasks import Classification
from spiralkit.train import OptimizerConfig, TrainConfig, train

RECIPE = """\
name: t
model: {name: mlp, kwargs: {in_features: 64, widths: [32]}}
data: {name: digits}
recover:
  kind: distill
  temperature_schedule: {shape: cosine, start: 4.0, end: 1.0}
  cache_teacher: false
  losses:
    - logits
    - {kind: logits, alpha: 0.5, temperature: 2.0, weight: 0.1}
    - {kind: hint, student: fc1, teacher: fc1, weight: 0.5}
    - {kind: attention_transfer, student: conv, teacher: {module: block, index: 0}, weight: 500}
    - {kind: attention_probs, student: {module: attn, index: 1}, teacher: {module: attn, index: 1}, pad_token: 0,
       values: [value, value]}
    - {kind: crd, student: fc1, teacher: fc1, dim: 16}
    - {kind: layers, map: [[fc1, fc1], [fc2, {module: fc2}]], adapt: false, weight: 0.1}
"""


def _mlp(widths: tuple[int, ...], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return mlp(in_features=4, widths=widths, num_classes=3)


def _data(n: int = 64) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=generator)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


# --------------------------------------------------------------------------- configs


def test_recipe_losses_parse_to_typed_terms_and_round_trip() -> None:
    recipe = parse_recipe(RECIPE)
    recover = recipe.recover
    assert isinstance(recover, Distill) and not recover.cache_teacher
    assert recover.temperature_schedule == TemperatureSchedule(shape="cosine", start=4.0, end=1.0)
    kinds = [type(term) for term in recover.losses]
    assert kinds == [LogitsTerm, LogitsTerm, HintTerm, AttentionTransferTerm, AttentionProbsTerm, CRDTerm, LayersTerm]
    assert recover.losses[0] == LogitsTerm()
    assert recover.losses[3].teacher == Tap(module="block", index=0)  # type: ignore[union-attr]
    assert recover.losses[4].values == (Tap(module="value"), Tap(module="value"))  # type: ignore[union-attr]
    assert recover.losses[6].map[1] == (Tap(module="fc2"), Tap(module="fc2"))  # type: ignore[union-attr]
    assert parse_recipe(dump_recipe(recipe)) == recipe


@pytest.mark.parametrize(
    ("replace", "by", "message"),
    [
        ("{kind: hint, student: fc1,", "{kind: hnt, student: fc1,", r"line 11: key 'recover.losses.2'"),
        ("teacher: fc1, weight: 0.5", "teacher: fc1, weight: -1", r"key 'recover.losses.2.weight'"),
        ("{kind: hint, student: fc1, teacher: fc1,", "{kind: hint, student: fc1,", r"missing required key 'recover.losses.2.teacher'"),
        ("map: [[fc1, fc1], [fc2, {module: fc2}]]", "map: []", r"key 'recover.losses.6.map'"),
        ("dim: 16", "dims: 16", r"unknown key 'recover.losses.5.dims'"),
    ],
    ids=["kind", "weight", "missing-tap", "empty-map", "typo"],
)
def test_recipe_loss_errors_name_the_key(replace: str, by: str, message: str) -> None:
    assert replace in RECIPE
    with pytest.raises(RecipeError, match=message):
        parse_recipe(RECIPE.replace(replace, by))


def test_default_losses_are_the_previous_logit_distillation() -> None:
    config = Distill(alpha=0.7, temperature=3.0)
    assert config.losses == (LogitsTerm(),)
    teacher, student = freeze(_mlp((5,), 0)), _mlp((5,), 1)
    x, y = _data(8)
    objective = config.objective(task=Classification(), teacher=teacher)
    expected = kd_loss(student(x), teacher(x), y, alpha=0.7, temperature=3.0)
    assert objective(student, x, y).item() == pytest.approx(expected.item(), rel=1e-6)
    assert list(objective.parameters()) == []  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- weighted terms by hand


def test_weighted_terms_sum_to_the_hand_computed_total() -> None:
    teacher, student = freeze(_mlp((5,), 0)), _mlp((5,), 1)
    x, y = _data(8)
    terms = (LogitsTerm(alpha=0.5, temperature=2.0), HintTerm(student="fc1", teacher="fc1", weight=0.25),
             LayersTerm(map=((Tap(module="fc1"), Tap(module="fc1")), (Tap(module="fc2"), Tap(module="fc2"))),
                        adapt=False, weight=2.0))
    objective = DistillObjective(teacher, terms, alpha=0.9, temperature=4.0)
    objective.prepare(student, x)
    assert list(objective.parameters()) == [], "equal widths: identity adapters, nothing to learn"
    kd = kd_loss(student(x), teacher(x), y, alpha=0.5, temperature=2.0)
    hint = F.mse_loss(student.fc1(x), teacher.fc1(x))
    layers = hint + F.mse_loss(student(x), teacher(x))
    total = objective(student, x, y)
    assert total.item() == pytest.approx((kd + 0.25 * hint + 2.0 * layers).item(), rel=1e-6)
    assert objective.last_terms["1:hint"] == pytest.approx(hint.item(), rel=1e-6)


def test_temperature_schedule_follows_progress_set_by_train() -> None:
    teacher, student = freeze(_mlp((5,), 0)), _mlp((5,), 1)
    schedule = TemperatureSchedule(shape="linear", start=4.0, end=1.0)
    objective = DistillObjective(teacher, (LogitsTerm(),), alpha=1.0, temperature=schedule)
    seen: list[float] = []

    def recording(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        seen.append(objective.current_temperature)
        return objective(model, x, y)

    recording.set_progress = objective.set_progress  # type: ignore[attr-defined]
    x, y = _data(16)
    train(student, TensorLoader(x, y, batch_size=4, shuffle=False), config=TrainConfig(epochs=1), objective=recording,
          seed=0)
    assert seen == pytest.approx([4.0, 3.0, 2.0, 1.0])
    objective.set_progress(0.5)
    x, y = x[:4], y[:4]
    assert objective(student, x, y).item() == pytest.approx(
        kd_loss(student(x), teacher(x), y, alpha=1.0, temperature=2.5).item(), rel=1e-6)


# --------------------------------------------------------------------------- learned parts


def test_adapters_and_projections_built_from_the_first_batch() -> None:
    teacher, student = freeze(_mlp((8,), 0)), _mlp((3,), 1)
    terms = (HintTerm(student="fc1", teacher="fc1"), CRDTerm(student="fc1", teacher="fc1", dim=4),
             LayersTerm(map=((Tap(module="relu1"), Tap(module="relu1")),)))
    objective = DistillObjective(teacher, terms, alpha=0.9, temperature=4.0)
    student.train()
    objective.prepare(student, _data(2)[0])
    assert student.training, "prepare restores the student's mode"
    shapes = [tuple(p.shape) for p in objective.parameters()]
    assert shapes == [(8, 3), (8,), (4, 3), (4,), (4, 8), (4,), (8, 3), (8,)]
    assert set(student.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_lazily_built_adapters_warn() -> None:
    teacher, student = freeze(_mlp((8,), 0)), _mlp((3,), 1)
    objective = DistillObjective(teacher, (HintTerm(student="fc1", teacher="fc1"),), alpha=0.9, temperature=4.0)
    with pytest.warns(UserWarning, match="call objective.prepare"):
        objective(student, *_data(4))


def test_distill_with_hint_and_logits_learns_and_trains_the_adapter() -> None:
    teacher, student = freeze(_mlp((16,), 0)), _mlp((4,), 1)
    x, y = _data(128)
    config = Distill(alpha=0.5, temperature=2.0, losses=(LogitsTerm(), HintTerm(student="relu1", teacher="relu1")),
                     train=TrainConfig(epochs=8, optimizer=OptimizerConfig(name="adam", lr=0.02)))
    objective = config.objective(task=Classification(), teacher=teacher)
    objective.prepare(student, x)  # type: ignore[attr-defined]
    before = objective(student, x, y).item()
    hint_before = objective.last_terms["1:hint"]  # type: ignore[attr-defined]
    adapter = objective.learned["1"].adapter  # type: ignore[attr-defined]
    initial = adapter.weight.detach().clone()
    train(student, TensorLoader(x, y, batch_size=32, shuffle=True), config=config.train, objective=objective, seed=0)
    assert adapter.weight.grad is not None and not torch.equal(adapter.weight, initial)
    assert objective(student, x, y).item() < 0.7 * before
    assert objective.last_terms["1:hint"] < hint_before / 3  # type: ignore[attr-defined]
    assert set(student.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    # The verb does the same and returns the plain student.
    other = distill(_mlp((4,), 1), teacher, TensorLoader(x, y, batch_size=32, shuffle=True), config=config,
                    task=Classification())
    assert set(other.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


# --------------------------------------------------------------------------- transformers


class TinyAttention(nn.Module):
    """Token ids → one self-attention layer returning (context, probabilities) → mean pool → logits."""

    def __init__(self, width: int, heads: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(10, width)
        self.value = nn.Linear(width, width)
        self.attn = _SelfAttention(width, heads, self.value)
        self.head = nn.Linear(width, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        context, _ = self.attn(self.embed(tokens), tokens != 0)
        return self.head(context.mean(dim=1))


class _SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, value: nn.Linear) -> None:
        super().__init__()
        self.heads, self.query, self.value = heads, nn.Linear(width, width), value

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        b, length, width = h.shape
        split = lambda t: t.view(b, length, self.heads, -1).transpose(1, 2)  # noqa: E731
        q, v = split(self.query(h)), split(self.value(h))
        scores = (q @ q.transpose(-1, -2)).masked_fill(~mask[:, None, None, :], float("-inf"))
        probs = scores.softmax(dim=-1)
        return (probs @ v).transpose(1, 2).reshape(b, length, width), probs


def test_attention_probs_term_masks_padding() -> None:
    teacher, student = freeze(TinyAttention(8, 2, 0)), TinyAttention(4, 2, 1)
    tokens = torch.tensor([[3, 4, 5, 0], [6, 7, 0, 0]])
    y = torch.tensor([0, 1])
    term = AttentionProbsTerm(student=Tap(module="attn", index=1), teacher=Tap(module="attn", index=1), pad_token=0,
                              values=(Tap(module="value"), Tap(module="value")))
    objective = DistillObjective(teacher, (term,), alpha=0.9, temperature=4.0)
    mask = tokens != 0
    probs_s = student.attn(student.embed(tokens), mask)[1]
    probs_t = teacher.attn(teacher.embed(tokens), mask)[1]
    values_s, values_t = student.value(student.embed(tokens)), teacher.value(teacher.embed(tokens))
    expected = attention_probs_loss(probs_s, probs_t, mask=mask) + value_relation_loss(values_s, values_t, heads=2,
                                                                                       mask=mask)
    loss = objective(student, tokens, y).item()
    assert loss == pytest.approx(expected.item(), rel=1e-5) and math.isfinite(loss) and loss > 0
    with torch.no_grad():
        student.embed.weight[0] += 5.0  # what the student computes at padded positions only
    assert objective(student, tokens, y).item() == pytest.approx(loss, rel=1e-6)


class _Packed(nn.Module):
    """TinyAttention over packed ``[ids; mask]`` rows, trimming all-padding columns like spiralkit's HF models."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        length = int(x[:, 1].sum(dim=1).max())
        return self.inner(x[:, 0, :length])


def test_attention_probs_term_masks_packed_inputs_by_their_attention_mask() -> None:
    teacher, student = freeze(TinyAttention(8, 2, 0)), TinyAttention(4, 2, 1)
    tokens = torch.tensor([[3, 4, 5, 0, 0], [6, 7, 0, 0, 0]])  # the last column is padding everywhere
    packed = torch.stack([tokens, (tokens != 0).long()], dim=1)
    y = torch.tensor([0, 1])
    term = AttentionProbsTerm(student=Tap(module="inner.attn", index=1), teacher=Tap(module="inner.attn", index=1))
    objective = DistillObjective(_Packed(teacher), (term,), alpha=0.9, temperature=4.0)
    packed_student = _Packed(student)
    trimmed = tokens[:, :3]
    mask = trimmed != 0
    expected = attention_probs_loss(student.attn(student.embed(trimmed), mask)[1],
                                    teacher.attn(teacher.embed(trimmed), mask)[1], mask=mask)
    assert objective(packed_student, packed, y).item() == pytest.approx(expected.item(), rel=1e-5)


def test_outputs_term_is_one_minus_cosine_or_mse_and_needs_no_labels() -> None:
    teacher, student = freeze(_mlp((8,), 0)), _mlp((4,), 1)
    x, _ = _data(16)
    s, t = student(x), teacher(x)
    cosine = DistillObjective(teacher, (OutputsTerm(),), alpha=0.9, temperature=4.0)
    assert cosine(student, x, None).item() == pytest.approx((1 - F.cosine_similarity(s, t, dim=-1)).mean().item(), rel=1e-5)
    mse = DistillObjective(teacher, (OutputsTerm(loss="mse", weight=2.0),), alpha=0.9, temperature=4.0)
    assert mse(student, x, None).item() == pytest.approx(2 * F.mse_loss(s, t).item(), rel=1e-5)
    with pytest.raises(DistillError, match=r"outputs: student outputs \(16, 2\) and teacher outputs \(16, 3\) differ"):
        DistillObjective(teacher, (OutputsTerm(),), alpha=0.9, temperature=4.0)(
            mlp(in_features=4, widths=(4,), num_classes=2), x, None)


# --------------------------------------------------------------------------- errors


def test_unknown_taps_are_named() -> None:
    teacher, student = freeze(_mlp((5,), 0)), _mlp((5,), 1)
    with pytest.raises(DistillError, match=r"teacher has no module 'fc7'; close names: 'fc2', 'fc1'"):
        DistillObjective(teacher, (HintTerm(student="fc1", teacher="fc7"),), alpha=0.9, temperature=4.0)
    objective = DistillObjective(teacher, (HintTerm(student="fcl", teacher="fc1"),), alpha=0.9, temperature=4.0)
    with pytest.raises(DistillError, match=r"student has no module 'fcl'; close names: 'fc2', 'fc1'"):
        objective.prepare(student, _data(2)[0])


def test_shapes_a_layer_map_cannot_bridge_name_the_pair() -> None:
    teacher, student = freeze(_mlp((5,), 0)), _mlp((3,), 1)
    x = _data(2)[0]
    bad = LayersTerm(map=((Tap(module="fc2"), Tap(module="fc2")), (Tap(module="fc1"), Tap(module="fc1"))), adapt=False)
    with pytest.raises(DistillError, match=r"layers pair 1 \('fc1' -> 'fc1'\): student feature \(2, 3\) and teacher "
                                           r"feature \(2, 5\) differ and adapters are off"):
        DistillObjective(teacher, (bad,), alpha=0.9, temperature=4.0).prepare(student, x)
    unflat = nn.Sequential(nn.Unflatten(1, (2, 2)), nn.Flatten(), nn.Linear(4, 3))
    odd = LayersTerm(map=((Tap(module="0"), Tap(module="fc1")),))
    with pytest.raises(DistillError, match=r"layers pair 0 \('0' -> 'fc1'\): student feature \(2, 2, 2\) and teacher "
                                           r"feature \(2, 5\) differ in more than their width"):
        DistillObjective(teacher, (odd,), alpha=0.9, temperature=4.0).prepare(unflat, x)
    at = AttentionTransferTerm(student="fc1", teacher="fc1")
    with pytest.raises(DistillError, match=r"attention_transfer 'fc1' -> 'fc1': needs \(B, C, H, W\) features"):
        DistillObjective(teacher, (at,), alpha=0.9, temperature=4.0)(student, x, torch.zeros(2, dtype=torch.long))
    with pytest.raises(DistillError, match=r"logits: student outputs \(2, 3\) and teacher outputs \(2, 2\)"):
        DistillObjective(freeze(nn.Linear(4, 2)), (LogitsTerm(),), alpha=0.9, temperature=4.0)(
            student, x, torch.zeros(2, dtype=torch.long))
