"""Report schema, Markdown and the terminal table."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from spiralkit.report import Measurement, Metrics, QuantInfo, Report, RoundRecord, TaskInfo, console_table, markdown, write_report


def metrics(**overrides: float) -> Metrics:
    values = dict(metric=98.4, val_metric=98.1, params=266_610, nonzero_params=266_610, sparsity=0.0,
                  size_bytes=1_066_968, dense_size_bytes=1_066_968, macs=266_200, latency_ms=0.09)
    return Metrics(**{**values, **overrides})


def sample(quantization: QuantInfo | None = None) -> Report:
    kept = RoundRecord(**metrics(nonzero_params=20_000, sparsity=0.925, size_bytes=120_000).model_dump(),
                       index=1, accepted=True, seconds=12.5, target=0.93, reason="kept")
    dropped = RoundRecord(**metrics(metric=90.0, val_metric=89.0).model_dump(),
                          index=2, accepted=False, seconds=3.0, target=0.97, reason="val drop 9.10 > 0.1")
    return Report(name="t", task=TaskInfo(metric="accuracy", higher_is_better=True),
                  measurement=Measurement(batch_size=1, threads=1, warmup=10, repeats=50),
                  baseline=metrics(), rounds=[kept, dropped], quantization=quantization,
                  final=metrics(nonzero_params=20_000, sparsity=0.925, size_bytes=120_000), stopped="target reached")


def test_json_schema_and_round_trip(tmp_path: Path) -> None:
    report = sample()
    write_report(report, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert list(data)[0] == "schema" and data["schema"] == "spiralkit.report/4"
    assert data["rounds"][1]["accepted"] is False
    assert Report.from_json((tmp_path / "report.json").read_text()) == report


def test_markdown_lists_every_round_and_the_summary() -> None:
    text = markdown(sample())
    assert "| round 1 |" in text and "| round 2 |" in text and "| final |" in text
    assert "no: val drop 9.10 > 0.1" in text
    assert "non-zero weights 13.3x fewer" in text


def test_console_table_fits_80_columns_untruncated() -> None:
    console = Console(width=80, record=True)
    console.print(console_table(sample()))
    text = console.export_text()
    assert "…" not in text
    assert "round 2 ✗" in text and "round 2 rolled back: val drop 9.10 > 0.1" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_every_latency_names_its_runtime_batch_and_threads(tmp_path: Path) -> None:
    report = sample(QuantInfo(kind="static-int8", method="ptq", bits={"*": 8}, artefact="int8/model.int8.onnx"))
    data = json.loads(report.to_json())
    for entry in [data["baseline"], *data["rounds"]]:
        assert (entry["latency_runtime"], entry["latency_batch_size"], entry["latency_threads"]) == ("eager", 1, 1)
    assert data["final"]["latency_runtime"] == "ort"


def test_a_schema_2_report_still_loads_with_its_latencies_named() -> None:
    """Version 2 had no latency_* fields: they come from the measurement, the runtime from the artefact."""
    data = json.loads(sample().to_json())
    data["schema"] = "spiralkit.report/2"
    data["measurement"] = {"batch_size": 64, "threads": 2, "warmup": 10, "repeats": 50}
    for entry in [data["baseline"], data["final"], *data["rounds"]]:
        for key in ("latency_runtime", "latency_batch_size", "latency_threads"):
            del entry[key]
    old = Report.from_json(json.dumps(data))
    assert old.schema_ == "spiralkit.report/4"
    assert (old.baseline.latency_runtime, old.baseline.latency_batch_size, old.baseline.latency_threads) == ("eager", 64, 2)
    assert old.final is not None and old.final.latency_runtime == "eager"  # no .onnx artefact: measured in PyTorch
    assert old.rounds[1].latency_threads == 2


def test_a_schema_3_report_loads_as_a_run_of_one_process() -> None:
    data = json.loads(sample().model_copy(update={"processes": 2}).to_json())
    assert data["processes"] == 2
    data["schema"] = "spiralkit.report/3"
    del data["processes"]
    old = Report.from_json(json.dumps(data))
    assert old.processes == 1 and old.schema_ == "spiralkit.report/4"


def test_a_recorded_latency_runtime_is_kept() -> None:
    named = metrics(latency_runtime="ort", latency_batch_size=8, latency_threads=4)
    report = sample().model_copy(update={"final": named})
    again = Report.from_json(report.to_json())
    assert again.final is not None and (again.final.latency_runtime, again.final.latency_batch_size) == ("ort", 8)
