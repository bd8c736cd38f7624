"""curves.json: the training loss per epoch of the baseline and of every round, kept across resume, drawn in report.html."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

import spiralkit.spiral.runner as runner
from spiralkit.errors import SpiralError
from spiralkit.report.curves import CURVES_SCHEMA, Curves, TrainingCurve
from spiralkit.report.html import report_html
from spiralkit.spiral import Spiral, parse_recipe
from spiralkit.spiral.rundir import CURVES, load_curves, load_run_state, record_training
from spiralkit.train import TrainConfig, supervised, train
from tests.test_report import sample

RECIPE = """\
name: curves
seed: 1
threads: 1
model: {name: mlp, kwargs: {in_features: 64, widths: [16]}}
data: {name: digits, batch_size: 64, val_fraction: 0.2}
train: {epochs: 3, optimizer: {name: adam, lr: 0.01}}
prune: {target_sparsity: 0.6, schedule: {kind: iterative, step: 0.3}}
recover: {kind: finetune, train: {epochs: 2, optimizer: {name: sgd, lr: 0.05}}}
targets: {max_metric_drop: 50.0}
measure: {repeats: 1, warmup: 0}
"""


def _run(run_dir: Path, *, resume: bool = False) -> None:
    Spiral(parse_recipe(RECIPE)).run(run_dir, resume=resume, console=Console(quiet=True))


def test_train_returns_the_mean_loss_of_every_epoch() -> None:
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    batches = [(torch.randn(4, 2), torch.randn(4, 1)) for _ in range(3)]
    losses: list[float] = []

    def objective(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.mse_loss(m(x), y)
        losses.append(loss.item())
        return loss

    stats = train(model, batches, config=TrainConfig(epochs=2, lr_schedule="constant"), objective=objective, seed=0)
    assert stats.epoch_losses == pytest.approx((sum(losses[:3]) / 3, sum(losses[3:]) / 3))
    none = train(model, batches, config=TrainConfig(epochs=0), objective=supervised(nn.functional.mse_loss), seed=0)
    assert none.epoch_losses == ()


def test_a_run_keeps_every_epoch_of_every_training(tmp_path: Path) -> None:
    _run(tmp_path / "run")
    data = json.loads((tmp_path / "run" / CURVES).read_text())
    assert data["schema"] == CURVES_SCHEMA
    curves = load_curves(tmp_path / "run")
    assert curves is not None
    state = load_run_state(tmp_path / "run")
    assert len(state.rounds) >= 2
    assert [(c.label, c.round, len(c.losses)) for c in curves.trainings] == [
        ("baseline", None, 3), *((f"round {r.index}", r.index, 2) for r in state.rounds)]
    assert all(math.isfinite(loss) and loss > 0 for c in curves.trainings for loss in c.losses)
    assert [(c.val_metric, c.accepted) for c in curves.trainings[1:]] == [(r.val_metric, r.accepted) for r in state.rounds]
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Training loss per epoch" in page and page.count("<svg") == 5


def test_curves_survive_a_killed_and_resumed_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_train, calls = runner.train, {"n": 0}

    def dying_train(*args, **kwargs):  # the baseline, round 1, then dies inside round 2
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(runner, "train", dying_train)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "run")
    before = load_curves(tmp_path / "run")
    assert before is not None and [c.label for c in before.trainings] == ["baseline", "round 1"]
    monkeypatch.setattr(runner, "train", real_train)
    _run(tmp_path / "run", resume=True)
    after = load_curves(tmp_path / "run")
    assert after is not None and [c.label for c in after.trainings][:3] == ["baseline", "round 1", "round 2"]
    assert after.trainings[:2] == before.trainings  # the earlier curves, not retrained
    _run(tmp_path / "reference")
    reference = load_curves(tmp_path / "reference")
    assert reference is not None and len(reference.trainings) == len(after.trainings)
    for resumed, uninterrupted in zip(after.trainings, reference.trainings):
        assert resumed.losses == pytest.approx(uninterrupted.losses, rel=1e-5)


def test_a_round_run_again_replaces_its_curve(tmp_path: Path) -> None:
    record_training(tmp_path, TrainingCurve(label="round 2", round=2, losses=(1.0,), accepted=False))
    record_training(tmp_path, TrainingCurve(label="round 1", round=1, losses=(2.0,), accepted=True))
    record_training(tmp_path, TrainingCurve(label="baseline", losses=(3.0, math.nan)))
    record_training(tmp_path, TrainingCurve(label="round 2", round=2, losses=(0.5,), accepted=True))
    curves = load_curves(tmp_path)
    assert curves is not None
    assert [(c.label, c.losses[0], c.accepted) for c in curves.trainings] == [
        ("baseline", 3.0, None), ("round 1", 2.0, True), ("round 2", 0.5, True)]
    assert math.isnan(curves.trainings[0].losses[1])  # JSON's NaN reads back


def test_a_run_dir_without_curves_has_none(tmp_path: Path) -> None:
    assert load_curves(tmp_path) is None


@pytest.mark.parametrize(
    ("text", "detail"),
    [('{"schema": "spiralkit.curves/0"}', "Input should be 'spiralkit.curves/1'"),
     ('{"trainings": [{"label": "round 0", "round": 0}]}', "Input should be greater than or equal to 1"),
     ("not json", "Invalid JSON")],
)
def test_a_bad_curves_file_is_named(tmp_path: Path, text: str, detail: str) -> None:
    (tmp_path / CURVES).write_text(text)
    with pytest.raises(SpiralError, match=rf"curves.json is not a spiralkit curves file \({detail}"):
        load_curves(tmp_path)


def test_the_loss_plot_marks_rounds_and_leaves_out_unknown_rounds() -> None:
    report = sample()  # round 1 kept, round 2 rolled back
    curves = Curves(trainings=(
        TrainingCurve(label="baseline", losses=(2.0, 1.0)),
        TrainingCurve(label="round 1", round=1, losses=(0.5,), accepted=True),
        TrainingCurve(label="round 2", round=2, losses=(0.9,), accepted=False),
        TrainingCurve(label="round 3", round=3, losses=(0.4,), accepted=True),  # interrupted before its state
    ))
    page = report_html(report, curves=curves)
    assert page.count("<svg") == 4 and "Training loss per epoch" in page
    for label in ("baseline training", "kept round", "rolled-back round"):
        assert label in page
    without = report_html(report)
    assert without.count("<svg") == 3 and "Training loss" not in without
    only_unknown = Curves(trainings=(TrainingCurve(label="round 9", round=9, losses=(1.0,)),))
    assert "Training loss" not in report_html(report, curves=only_unknown)
