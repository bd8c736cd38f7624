"""Mixed precision: sensitivity scan, and bit widths under a size budget (DP vs brute force)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch import nn

from spiralkit.models import mlp
from spiralkit.quant.affine import QuantError
from spiralkit.quant.mixed import (
    FLOAT_BITS,
    MAX_BUDGET_UNITS,
    SensitivityTable,
    choose_bits,
    sensitivity_scan,
    weight_counts,
)

LAYERS = ("fc1", "fc2", "fc3")
IMPORTANCE = {"fc1": 1.0, "fc2": 10.0, "fc3": 100.0}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return mlp(in_features=16, widths=(12, 8), num_classes=4)


def _weighted_error(reference: nn.Module):  # noqa: ANN202 - a metric closure
    """A hand-made metric: −Σ_l importance_l · mean|W_l − W_l(float)|, so fc3 matters most."""
    originals = {name: getattr(reference, name).weight.detach().clone() for name in LAYERS}

    def evaluate(model: nn.Module) -> float:
        return -sum(
            IMPORTANCE[name] * float((getattr(model, name).weight.detach() - originals[name]).abs().mean()) for name in LAYERS
        )

    return evaluate


# --------------------------------------------------------------------------- scan


def test_scan_orders_layers_by_importance_and_bits_and_leaves_the_model_alone() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = sensitivity_scan(model, layers=LAYERS, bits=(2, 4, 8), evaluate=_weighted_error(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert table.baseline == 0.0
    assert table.layers == LAYERS and table.bits == (2, 4, 8)
    for b in table.bits:  # only one layer is quantized per entry, so the importance decides
        drops = [table.drop(name, b, higher_is_better=True) for name in LAYERS]
        assert 0 < drops[0] < drops[1] < drops[2]
    for name in LAYERS:  # more bits, less damage
        drops = [table.drop(name, b, higher_is_better=True) for b in table.bits]
        assert drops[0] > drops[1] > drops[2] > 0


def test_scan_defaults_to_every_layer_and_checks_names() -> None:
    model = _model()
    table = sensitivity_scan(model, bits=(8,), evaluate=lambda m: 1.0)
    assert table.layers == LAYERS
    with pytest.raises(QuantError, match=r"unknown layer name\(s\) 'fc9', 'relu1': not Linear/Conv layers of MLP; "
                                         r"its layers are: fc1, fc2, fc3"):
        sensitivity_scan(model, layers=("fc1", "fc9", "relu1"), evaluate=lambda m: 1.0)
    with pytest.raises(QuantError, match=r"bits must be an integer in 2\.\.8, got 1"):
        sensitivity_scan(model, bits=(1, 4), evaluate=lambda m: 1.0)


def test_table_prints_as_a_table_and_round_trips_through_json() -> None:
    table = SensitivityTable(baseline=97.5, metrics={"conv1": {4: 97.0, 8: 97.5}, "fc": {4: 90.25, 8: 97.4}})
    text = str(table)
    lines = text.splitlines()
    assert "baseline 97.5" in lines[0]
    assert lines[1].split() == ["layer", "4", "bit", "8", "bit"]
    assert lines[3].split() == ["conv1", "-0.5", "+0"] and lines[4].split() == ["fc", "-7.25", "-0.1"]
    assert json.loads(table.to_json())["metrics"]["fc"] == {"4": 90.25, "8": 97.4}
    assert SensitivityTable.from_json(table.to_json()) == table
    with pytest.raises(QuantError, match="not a sensitivity table"):
        SensitivityTable.from_json('{"metrics": 3}')


# --------------------------------------------------------------------------- choose


def _table() -> SensitivityTable:
    """Three layers × three widths; distinct drops so every optimum is unique."""
    return SensitivityTable(
        baseline=0.0,
        metrics={
            "a": {2: -5.0, 4: -1.3, 8: -0.11},
            "b": {2: -0.9, 4: -0.52, 8: -0.007},
            "c": {2: -20.0, 4: -2.1, 8: -0.05},
        },
    )


COUNTS = {"a": 100, "b": 300, "c": 50}


def _brute_force(
    table: SensitivityTable, budget: int, counts: dict[str, int] = COUNTS
) -> tuple[float, dict[str, int]] | None:
    best: tuple[float, dict[str, int]] | None = None
    for widths in itertools.product(table.bits, repeat=len(table.layers)):
        chosen = dict(zip(table.layers, widths, strict=True))
        size = sum(math.ceil(counts[name] * b / 8) for name, b in chosen.items())
        loss = sum(table.drop(name, b, higher_is_better=True) for name, b in chosen.items())
        if size <= budget and (best is None or loss < best[0]):
            best = (loss, chosen)
    return best


def test_choose_bits_matches_brute_force_at_every_budget() -> None:
    table = _table()
    smallest = sum(math.ceil(n * 2 / 8) for n in COUNTS.values())
    largest = sum(n for n in COUNTS.values())
    for budget in range(smallest, largest + 2):
        expected = _brute_force(table, budget)
        assert expected is not None
        chosen = choose_bits(table, size_of=COUNTS, budget_bytes=budget, higher_is_better=True)
        assert chosen == expected[1], budget


def test_choose_bits_with_a_size_function_and_a_lower_is_better_metric() -> None:
    table = SensitivityTable(baseline=1.0, metrics={"x": {2: 3.0, 8: 1.1}, "y": {2: 1.2, 8: 1.0}})

    def size_of(layer: str, bits: int) -> int:
        return 10 * bits

    assert choose_bits(table, size_of=size_of, budget_bytes=100, higher_is_better=False) == {"x": 8, "y": 2}
    assert choose_bits(table, size_of=size_of, budget_bytes=160, higher_is_better=False) == {"x": 8, "y": 8}


def test_keep_float_layers_get_32_bits_and_count_against_the_budget() -> None:
    table = _table()
    chosen = choose_bits(table, size_of=COUNTS, budget_bytes=200 + 175, higher_is_better=True, keep_float=("c",))
    assert chosen == {"a": 8, "b": 2, "c": FLOAT_BITS}
    with pytest.raises(QuantError, match=r"keep_float pattern 'z\*' matches no layer of the table; layers are: a, b, c"):
        choose_bits(table, size_of=COUNTS, budget_bytes=10_000, higher_is_better=True, keep_float=("z*",))


def test_improvements_count_as_zero_and_ties_go_to_more_bits() -> None:
    table = SensitivityTable(baseline=50.0, metrics={"a": {4: 50.2, 8: 50.0}})
    assert choose_bits(table, size_of={"a": 8}, budget_bytes=8, higher_is_better=True) == {"a": 8}
    assert choose_bits(table, size_of={"a": 8}, budget_bytes=7, higher_is_better=True) == {"a": 4}


def test_large_budgets_are_discretised_but_never_exceeded() -> None:
    table = _table()
    counts = {name: n * 1000 for name, n in COUNTS.items()}
    budget = 260_000
    assert budget > MAX_BUDGET_UNITS
    chosen = choose_bits(table, size_of=counts, budget_bytes=budget, higher_is_better=True)
    assert sum(math.ceil(counts[name] * b / 8) for name, b in chosen.items()) <= budget
    expected = _brute_force(table, budget, counts)
    assert expected is not None and chosen == expected[1]


def test_budget_below_the_minimum_is_an_error() -> None:
    with pytest.raises(QuantError, match=r"budget of 100 bytes is below the smallest possible size, 113 bytes "
                                         r"\(every layer at 2 bits\)"):
        choose_bits(_table(), size_of=COUNTS, budget_bytes=100, higher_is_better=True)
    with pytest.raises(QuantError, match=r"budget of 299 bytes is below the smallest possible size, 300 bytes "
                                         r"\(every layer at 2 bits, float layers at 32 bits\)"):
        choose_bits(_table(), size_of=COUNTS, budget_bytes=299, higher_is_better=True, keep_float=("c",))


def test_weight_counts_of_a_model() -> None:
    assert weight_counts(_model()) == {"fc1": 16 * 12, "fc2": 12 * 8, "fc3": 8 * 4}
    with pytest.raises(QuantError, match=r"unknown layer name\(s\) 'flatten'"):
        weight_counts(_model(), ["flatten"])
