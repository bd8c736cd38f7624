"""report.html and compare.html: content, escaping, old reports, the Pareto front, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from spiralkit.errors import ModelError, SpiralError
from spiralkit.export import save_weights
from spiralkit.report import QuantInfo, Report, TaskInfo, layer_sparsity, write_compare_html, write_html_report
from spiralkit.report.html import CompareRun, compare_html, pareto_front, report_html
from tests.test_report import metrics, sample

HOSTILE = "<script>alert('x')</script>"


def _no_markup_from_data(page: str) -> None:
    assert "<script" not in page.lower() and "&lt;script&gt;" in page
    assert re.search(r"(src|href)=\"(https?:)?//", page) is None  # nothing fetched from the network


def test_report_page_has_the_table_plots_and_escaped_recipe() -> None:
    report = sample().model_copy(update={"name": f"n{HOSTILE}"})
    page = report_html(report, recipe_text=f"name: {HOSTILE}\n", layers={"fc1.weight": 0.5, "fc2.weight": 0.9})
    _no_markup_from_data(page)
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert page.count("<svg") == 4  # per round, along the spiral, before/after, per layer
    assert '<tr class="rolled-back"><td>round 2</td>' in page and '<tr class="kept"><td>round 1</td>' in page
    assert "no: val drop 9.10 &gt; 0.1" in page and "@media print" in page
    assert "fc2.weight" in page


def test_report_page_shows_bits_per_layer() -> None:
    report = sample().model_copy(update={"quantization": QuantInfo(kind="compact", method="ptq",
                                                                   bits={"net.0": 4, "net.2": 8}, artefact="m")})
    page = report_html(report)
    assert page.count("<svg") == 4 and "bits per layer" in page and "net.2" in page


def test_an_old_report_without_rounds_or_final_renders(tmp_path: Path) -> None:
    data = json.loads(sample().to_json())
    for key in ("rounds", "final", "stopped", "student", "pruned", "quantization"):
        data.pop(key)
    report = Report.model_validate(data)
    written = write_html_report(report, tmp_path, recipe_text=None, weights=tmp_path / "absent.safetensors")
    page = written.read_text()
    assert written.name == "report.html" and "run not finished" in page
    assert page.count("<svg") == 1 and "Recipe" not in page and "Per layer" not in page


def test_layer_sparsity_counts_zeros_of_weight_matrices(tmp_path: Path) -> None:
    state = {"fc.weight": torch.tensor([[0.0, 1.0], [0.0, 0.0]]), "fc.bias": torch.zeros(2),
             "norm.weight": torch.zeros(2)}
    assert layer_sparsity(state) == {"fc.weight": 0.75}
    save_weights(state, tmp_path / "model.safetensors")
    page = write_html_report(sample(), tmp_path, recipe_text="a: 1", weights=tmp_path / "model.safetensors").read_text()
    assert "fc.weight" in page and "norm.weight" not in page


def test_unreadable_weights_are_named(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="model.safetensors"):
        write_html_report(sample(), tmp_path, recipe_text=None, weights=tmp_path / "model.safetensors")


@pytest.mark.parametrize(
    ("higher", "front"),
    [(True, [0, 1, 3]), (False, [0, 2])],
)
def test_pareto_front(higher: bool, front: list[int]) -> None:
    # (cost, metric): 2 is beaten by 1 when higher is better (costs more, scores less).
    points = [(1.0, 90.0), (2.0, 95.0), (3.0, 80.0), (4.0, 97.0), (5.0, 96.0)]
    assert pareto_front(points, higher_is_better=higher) == front


def test_pareto_front_keeps_ties_once() -> None:
    assert pareto_front([(1.0, 5.0), (1.0, 5.0), (2.0, 4.0)], higher_is_better=True) == [0, 1]


def test_compare_page_table_front_and_escaped_differences(tmp_path: Path) -> None:
    first, second = sample(), sample().model_copy(update={"final": metrics(metric=99.0, size_bytes=5_000)})
    unfinished = sample().model_copy(update={"final": None})
    runs = [CompareRun("a", first, []), CompareRun(f"b{HOSTILE}$x", second, [("prune.target", 0.5, HOSTILE)]),
            CompareRun("c", unfinished, None)]
    page = write_compare_html(runs, tmp_path / "out").read_text()
    _no_markup_from_data(page)
    assert page.count("<svg") == 1 and "Pareto front" in page
    assert "<td>prune.target</td><td>0.5</td>" in page and "a recipe is missing" in page
    assert page.count("<tr><td>") == 4  # three runs and one recipe difference
    assert "<td>99.00</td><td>4.88 KB</td>" in page


def test_compare_errors(tmp_path: Path) -> None:
    with pytest.raises(SpiralError, match="nothing to compare"):
        compare_html([])
    other = sample().model_copy(update={"task": TaskInfo(metric="perplexity", higher_is_better=False)})
    with pytest.raises(SpiralError, match="different task metrics: accuracy and perplexity"):
        compare_html([CompareRun("a", sample()), CompareRun("b", other)])
    (tmp_path / "file").write_text("")
    with pytest.raises(SpiralError, match="cannot create .*file/out"):
        write_compare_html([CompareRun("a", sample())], tmp_path / "file" / "out")
