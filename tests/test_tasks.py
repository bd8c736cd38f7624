"""Tasks: classification accuracy and embedding fidelity, their losses, the recipe union, errors."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import TypeAdapter, ValidationError
from torch import Tensor, nn

from spiralkit.errors import SpiralError
from spiralkit.tasks import (
    Classification,
    EmbeddingFidelity,
    Perplexity,
    Task,
    evaluate,
    metric_drop,
    within_tolerance,
)


def _rotation(degrees: float) -> nn.Linear:
    """A bias-free 2-D rotation: cos(angle between input and output) = cos(degrees)."""
    angle = math.radians(degrees)
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]))
    return layer


def _batches() -> list[tuple[Tensor, Tensor]]:
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [-1.0, 1.0], [0.5, -2.0]])
    return [(x[:3], torch.zeros(3, dtype=torch.long)), (x[3:], torch.zeros(2, dtype=torch.long))]


def test_fidelity_is_the_mean_cosine_to_the_reference() -> None:
    reference = nn.Identity()
    result = evaluate(EmbeddingFidelity(), _rotation(60.0), _batches(), reference=reference)
    assert result.metric == pytest.approx(0.5) and result.loss == pytest.approx(0.5) and result.examples == 5
    same = evaluate(EmbeddingFidelity(), reference, _batches(), reference=reference)
    assert same.metric == pytest.approx(1.0)
    opposite = evaluate(EmbeddingFidelity(), _rotation(180.0), _batches(), reference=reference)
    assert opposite.metric == pytest.approx(-1.0)


def test_fidelity_evaluation_restores_modes_and_uses_eval_mode() -> None:
    model, reference = nn.Sequential(nn.Dropout(0.9), _rotation(0.0)), nn.Dropout(0.9)
    model.train()
    reference.train()
    result = evaluate(EmbeddingFidelity(), model, _batches(), reference=reference)
    assert result.metric == pytest.approx(1.0)  # no dropout while evaluating
    assert model.training and model[0].training and reference.training


def test_fidelity_loss_is_one_minus_cosine_with_gradients() -> None:
    task = EmbeddingFidelity()
    outputs = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    loss = task.loss(outputs, targets)
    assert loss.item() == pytest.approx((0.0 + (1 - 1 / math.sqrt(2))) / 2)
    loss.backward()
    assert outputs.grad is not None and float(outputs.grad.abs().sum()) > 0


def test_fidelity_errors_are_explained() -> None:
    with pytest.raises(SpiralError, match="fidelity task compares embeddings with a reference model: pass reference="):
        evaluate(EmbeddingFidelity(), nn.Identity(), _batches())
    with pytest.raises(SpiralError, match=r"got outputs \(2, 2\) and targets \(2,\); train it against the reference"):
        EmbeddingFidelity().loss(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(SpiralError, match=r"embeddings differ in shape: \(3, 2\) vs \(3, 3\)"):
        evaluate(EmbeddingFidelity(), nn.Identity(), _batches()[:1], reference=nn.Linear(2, 3))
    with pytest.raises(SpiralError, match="cannot evaluate on an empty data split"):
        evaluate(EmbeddingFidelity(), nn.Identity(), [], reference=nn.Identity())


def test_classification_ignores_a_reference() -> None:
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    batches = [(torch.tensor([[2.0, 1.0], [0.0, 1.0], [1.0, 3.0]]), torch.tensor([0, 1, 0]))]
    result = evaluate(Classification(), model, batches, reference=nn.Identity())
    assert result.metric == pytest.approx(200.0 / 3) and result.examples == 3
    assert evaluate(Classification(), model, batches).metric == result.metric


def test_task_union_parses_every_kind_and_names_unknown_ones() -> None:
    adapter = TypeAdapter(Task)
    assert adapter.validate_python("fidelity") == EmbeddingFidelity()
    assert adapter.validate_python("perplexity") == Perplexity()
    assert adapter.validate_python({"kind": "classification", "top_k": 5}) == Classification(top_k=5)
    with pytest.raises(ValidationError, match="'classification', 'fidelity', 'perplexity'"):
        adapter.validate_python("bleu")
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        adapter.validate_python({"kind": "fidelity", "top_k": 1})


def test_metric_names_and_drop() -> None:
    assert EmbeddingFidelity().metric_name == "cosine_fidelity" and EmbeddingFidelity().higher_is_better
    assert metric_drop(EmbeddingFidelity(), baseline=1.0, value=0.97) == pytest.approx(0.03)
    assert metric_drop(Classification(), baseline=90.0, value=91.0) == pytest.approx(-1.0)


def test_a_drop_equal_to_the_tolerance_is_within_it_despite_float_rounding() -> None:
    # 12 of 6,000 validation images are 0.2 points, but the float difference reads 0.2000000000000028
    baseline, twelve_fewer, thirteen_fewer = 100 * 5894 / 6000, 100 * 5882 / 6000, 100 * 5881 / 6000
    assert metric_drop(Classification(), baseline=baseline, value=twelve_fewer) > 0.2  # what a plain `>` rejected
    assert within_tolerance(Classification(), baseline=baseline, value=twelve_fewer, tolerance=0.2)
    assert not within_tolerance(Classification(), baseline=baseline, value=thirteen_fewer, tolerance=0.2)
    assert within_tolerance(Classification(), baseline=baseline, value=baseline, tolerance=0.0)
    assert not within_tolerance(Classification(), baseline=baseline, value=twelve_fewer, tolerance=0.0)
    # lower is better (perplexity): a rise is the drop
    assert within_tolerance(Perplexity(), baseline=10.0, value=10.5, tolerance=0.5)
    assert not within_tolerance(Perplexity(), baseline=10.0, value=10.6, tolerance=0.5)
    assert within_tolerance(Perplexity(), baseline=10.0, value=9.0, tolerance=0.0)
