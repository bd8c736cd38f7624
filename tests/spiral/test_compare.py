"""`spiral compare`: three methods from one baseline at the same recovery epochs, on a tiny MLP."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
import torch
import yaml
from rich.console import Console
from typer.testing import CliRunner

import spiralkit.cli
import spiralkit.spiral.runner
from spiralkit.cli import app
from spiralkit.errors import RecipeError, SpiralError
from spiralkit.export import load_state
from spiralkit.prune.schedules import OneShot
from spiralkit.report import Report
from spiralkit.spiral.compare import (
    METHODS, NO_ROLLBACK, ONE_SHOT, CompareConfig, Comparison, MethodResult, compare, comparison_table, lead, one_shot_recipe,
    spiral_epochs,
)
from spiralkit.spiral.recipe import parse_recipe
from spiralkit.spiral.recovery import Distill, Finetune
from tests.spiral.tiny import TINY

PRUNE = "prune:\n  target_sparsity: 0.6\n  schedule: {kind: agp, rounds: 2}\n"
DISTILL = "recover: {kind: distill, alpha: 0.7, train: {epochs: 1, optimizer: {name: sgd, lr: 0.05}, lr_schedule: constant}}"


def _replaced(text: str, old: str, new: str) -> str:
    assert old in text, f"{old!r} is not in the recipe"
    return text.replace(old, new)


# TINY with two AGP rounds recovered by distillation, and a quantize stage (which compare drops).
RECIPE = _replaced(_replaced(TINY, "prune:\n  target_sparsity: 0.5\n  schedule: {kind: one-shot}\n", PRUNE),
                   "recover: {kind: finetune, train: {epochs: 1, optimizer: {name: sgd, lr: 0.05}}}",
                   DISTILL) + "quantize: {kind: compact, bits: 5}\n"
FIELDS = {"metric_mean", "metric_std", "macs_ratio", "sparsity", "epochs"}


@dataclass
class Trainings:
    """The training calls of the spiral runner, by description (``baseline``, ``round 1 recover``…)."""

    descriptions: list[str]

    @property
    def baseline(self) -> int:
        return self.descriptions.count("baseline")


@pytest.fixture
def count_trainings(monkeypatch: pytest.MonkeyPatch) -> Trainings:
    return _count(monkeypatch)


def _count(monkeypatch: pytest.MonkeyPatch) -> Trainings:
    seen = Trainings([])
    real = spiralkit.spiral.runner.train

    def counting(*args: Any, **kwargs: Any) -> Any:
        seen.descriptions.append(kwargs.get("description", ""))
        return real(*args, **kwargs)

    monkeypatch.setattr(spiralkit.spiral.runner, "train", counting)
    return seen


@dataclass
class Compared:
    out: Path
    result: Comparison
    trainings: Trainings


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Compared]:
    """One comparison of two seeds, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as monkeypatch:
        trainings = _count(monkeypatch)
        result = compare(parse_recipe(RECIPE), out, CompareConfig(seeds=2), console=Console(quiet=True))
    yield Compared(out, result, trainings)


def _saved_recipe(run_dir: Path) -> dict[str, Any]:
    return yaml.safe_load((run_dir / "recipe.yaml").read_text())


def test_json_has_every_method_and_its_fields(compared: Compared) -> None:
    data = json.loads((compared.out / "compare.json").read_text())
    assert set(data["methods"]) == set(METHODS) == {"spiral", "oneshot_finetune", "oneshot_distill"}
    for method in data["methods"].values():
        assert FIELDS <= set(method)
        assert len(method["metrics"]) == len(method["runs"]) == 2
        assert method["metric_mean"] == pytest.approx(sum(method["metrics"]) / 2)
    assert data["seeds"] == [1, 2] and data["axis"] == "sparsity"
    assert data["dropped"] == ["quantize"]
    assert Comparison.model_validate(data) == compared.result


def test_json_has_the_spirals_lead_over_each_one_shot_method(compared: Compared) -> None:
    data = json.loads((compared.out / "compare.json").read_text())
    assert set(data["leads"]) == set(ONE_SHOT)
    spiral = data["methods"]["spiral"]
    for method, ahead in data["leads"].items():
        other = data["methods"][method]
        assert ahead["difference"] == pytest.approx(spiral["metric_mean"] - other["metric_mean"])
        assert ahead["per_seed"] == pytest.approx([a - b for a, b in zip(spiral["metrics"], other["metrics"], strict=True)])
        assert ahead["separated"] == (ahead["difference"] > spiral["metric_std"] + other["metric_std"])


def _result(metrics: list[float]) -> MethodResult:
    mean, std = statistics.fmean(metrics), statistics.stdev(metrics)
    return MethodResult(metric_mean=mean, metric_std=std, macs_ratio=1.0, macs_ratio_std=0.0, sparsity=0.9,
                        sparsity_std=0.0, epochs=10, metrics=metrics, runs=[])


def test_lead_is_apart_only_beyond_both_stds_and_follows_the_metrics_direction() -> None:
    spiral, close, far = _result([88.2, 88.3, 88.4]), _result([87.9, 88.0, 88.1]), _result([87.0, 87.1, 87.2])
    assert lead(spiral, far, higher_is_better=True).separated
    near = lead(spiral, close, higher_is_better=True)  # 0.3 apart, stds 0.1 + 0.1: apart
    assert near.difference == pytest.approx(0.3) and near.separated
    assert not lead(spiral, _result([88.05, 88.15, 88.25]), higher_is_better=True).separated  # 0.15 < 0.1 + 0.1
    lower = lead(spiral, far, higher_is_better=False)  # e.g. perplexity: the spiral's higher value is worse
    assert lower.difference == pytest.approx(-1.2) and lower.per_seed == pytest.approx([-1.2] * 3)
    assert not lower.separated


def test_table_shows_the_leads(compared: Compared) -> None:
    console = Console(width=80, record=True)
    console.print(comparison_table(compared.result))
    text = " ".join(console.export_text().split())  # the caption wraps
    assert "spiral's lead" in text and "…" not in text  # nothing cut at 80 columns
    for method, ahead in compared.result.leads.items():
        assert f"{ahead.difference:+.2f} over {method}{' (apart)' if ahead.separated else ''}" in text


def test_a_compare_json_without_leads_still_reads(compared: Compared) -> None:
    data = json.loads((compared.out / "compare.json").read_text())
    del data["leads"]  # written before leads were added
    assert Comparison.model_validate(data).leads == {}


def test_one_shot_methods_get_the_spirals_epochs(compared: Compared) -> None:
    methods = compared.result.methods
    for seed in range(2):
        spiral = methods["spiral"].runs[seed]
        assert spiral.rounds >= 2 and spiral.epochs == spiral.rounds * 1  # every round, 1 epoch each
        for method in ("oneshot_finetune", "oneshot_distill"):
            run = methods[method].runs[seed]
            assert (run.rounds, run.epochs) == (1, spiral.epochs)
            saved = _saved_recipe(compared.out / run.run_dir)
            assert saved["recover"]["train"]["epochs"] == spiral.epochs
            assert saved["recover"]["train"]["optimizer"]["name"] == "sgd"
            assert saved["recover"]["train"]["lr_schedule"] == "constant"
            assert saved["prune"][0]["schedule"] == {"kind": "one-shot"}
    assert methods["oneshot_finetune"].epochs == methods["oneshot_distill"].epochs == methods["spiral"].epochs


def test_recoveries_of_the_methods(compared: Compared) -> None:
    recover = {m: _saved_recipe(compared.out / "seed0" / m)["recover"] for m in METHODS}
    assert recover["oneshot_finetune"]["kind"] == "finetune"
    assert recover["oneshot_distill"]["kind"] == recover["spiral"]["kind"] == "distill"
    assert recover["oneshot_distill"]["alpha"] == 0.7  # the recipe's distillation, not the default


def test_plots_are_written(compared: Compared) -> None:
    png, svg = compared.out / "compare.png", compared.out / "compare.svg"
    assert png.stat().st_size > 0 and svg.stat().st_size > 0
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    text = svg.read_text()
    assert "<svg" in text and "oneshot_finetune" in text


def test_seeds_change_the_result(compared: Compared) -> None:
    runs = compared.result.methods["spiral"].runs
    assert [r.seed for r in runs] == [1, 2]
    first, second = (load_state(compared.out / f"seed{i}" / "spiral" / "model.safetensors") for i in range(2))
    assert any(not torch.equal(first[name], second[name]) for name in first)


def test_baseline_trained_once_and_read_by_every_method(compared: Compared) -> None:
    assert compared.trainings.baseline == 1
    checkpoint = (compared.out / "baseline" / "baseline.safetensors").resolve()
    for seed in range(2):
        for method in METHODS:
            saved = _saved_recipe(compared.out / f"seed{seed}" / method)
            assert Path(saved["model"]["checkpoint"]) == checkpoint
            assert saved["train"] is None and saved["quantize"] is None
            assert saved["seed"] == 1 + seed


def test_spiral_epochs_count_rolled_back_rounds(compared: Compared) -> None:
    report = Report.from_json((compared.out / "seed0" / "spiral" / "report.json").read_text())
    assert [r.epochs for r in report.rounds] == [1] * len(report.rounds)  # each round records its epochs
    rolled_back = report.rounds[0].model_copy(update={"accepted": False, "reason": "val drop", "epochs": 5})
    with_rollback = report.model_copy(update={"rounds": [rolled_back, *report.rounds]})
    assert spiral_epochs(with_rollback, per_round=3) == 5 + len(report.rounds)
    unrecorded = [r.model_copy(update={"epochs": None}) for r in with_rollback.rounds]  # an older report
    assert spiral_epochs(report.model_copy(update={"rounds": unrecorded}), per_round=3) == 3 * (len(report.rounds) + 1)


def test_last_epochs_recover_the_round_reaching_the_target_longer(tmp_path: Path) -> None:
    recipe = parse_recipe(_replaced(RECIPE, "alpha: 0.7, train: {epochs: 1,", "alpha: 0.7, last_epochs: 3, train: {epochs: 1,"))
    result = compare(recipe, tmp_path, CompareConfig(seeds=1), console=Console(quiet=True))
    report = Report.from_json((tmp_path / "seed0" / "spiral" / "report.json").read_text())
    epochs = [r.epochs for r in report.rounds]
    reached = [r.target >= 0.6 - 1e-6 for r in report.rounds]
    assert reached[-1] and not reached[0] and epochs == [3 if r else 1 for r in reached]
    assert result.methods["spiral"].epochs == sum(epochs)
    for method in ("oneshot_finetune", "oneshot_distill"):
        saved = _saved_recipe(tmp_path / "seed0" / method)["recover"]
        assert saved["train"]["epochs"] == sum(epochs) and saved["last_epochs"] is None
        assert result.methods[method].epochs == sum(epochs)


def test_one_shot_recipe_of_a_hybrid_finetuning_recipe() -> None:
    hybrid = "prune:\n  - {kind: structured, target_reduction: 0.5}\n  - {kind: unstructured, target_sparsity: 0.5}\n"
    recipe = parse_recipe(_replaced(_replaced(RECIPE, PRUNE, hybrid), "kind: distill, alpha: 0.7,", "kind: finetune,")
                          .replace("quantize: {kind: compact, bits: 5}\n", ""))
    distil = one_shot_recipe(recipe, "oneshot_distill", epochs=5)
    assert all(stage.schedule == OneShot() for stage in distil.prune)
    assert isinstance(distil.recover, Distill) and distil.recover.alpha == Distill().alpha
    assert distil.recover.train.epochs == 3  # ceil(5 / 2 stages): one round per stage
    assert distil.targets.max_metric_drop == NO_ROLLBACK and distil.targets.max_rounds == 2
    finetune = one_shot_recipe(recipe, "oneshot_finetune", epochs=4)
    assert isinstance(finetune.recover, Finetune) and finetune.recover.train.epochs == 2


def test_seeds_below_one_is_an_error() -> None:
    with pytest.raises(SpiralError, match=r"--seeds must be at least 1 \(got 0\)"):
        CompareConfig(seeds=0)


def test_recipe_without_prune_stage_is_an_error(tmp_path: Path) -> None:
    recipe = parse_recipe(_replaced(RECIPE, PRUNE, ""))
    with pytest.raises(RecipeError, match="has no prune stage: spiral compare compares ways of pruning"):
        compare(recipe, tmp_path / "out", CompareConfig(seeds=1), console=Console(quiet=True))
    assert not (tmp_path / "out").exists()


def test_recipe_naming_code_needs_allow_code(tmp_path: Path) -> None:
    recipe = parse_recipe(_replaced(RECIPE, "{name: mlp,", "{name: 'mypackage.models:build',"))
    with pytest.raises(RecipeError, match="--allow-code"):
        compare(recipe, tmp_path / "out", CompareConfig(seeds=1), console=Console(quiet=True))
    assert not (tmp_path / "out").exists()


def test_cli_passes_allow_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[CompareConfig] = []
    monkeypatch.setattr(spiralkit.cli, "compare", lambda recipe, out, config: seen.append(config))
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE)
    result = CliRunner().invoke(app, ["compare", str(path), "--seeds", "2", "--allow-code", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert seen == [CompareConfig(seeds=2, allow_code=True)]


def test_cli_seeds_zero(tmp_path: Path) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE)
    result = CliRunner().invoke(app, ["compare", str(path), "--seeds", "0", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "--seeds must be at least 1 (got 0)" in result.output
    assert not (tmp_path / "out").exists()


def test_cli_compares_and_resumes_a_killed_comparison(tmp_path: Path, count_trainings: Trainings) -> None:
    path, out = tmp_path / "tiny.yaml", tmp_path / "out"
    path.write_text(RECIPE)
    command = ["compare", str(path), "--seeds", "1", "--out", str(out)]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    assert "spiral compare — tiny" in result.output and "oneshot_distill" in result.output
    assert " ± " in result.output
    first = json.loads((out / "compare.json").read_text())
    # As if killed during the last method: its state is gone, and so is compare.json.
    (out / "seed0" / "oneshot_distill" / "state.json").unlink()
    (out / "compare.json").unlink()
    count_trainings.descriptions.clear()
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    assert count_trainings.descriptions == ["round 1 recover"]  # only the unfinished run trained
    again = json.loads((out / "compare.json").read_text())
    assert {m: r["metrics"] for m, r in again["methods"].items()} == {m: r["metrics"] for m, r in first["methods"].items()}
