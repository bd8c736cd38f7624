"""The spiral on real (tiny) data: rounds, rollback on a metric drop and on NaN, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from spiralkit.errors import ModelError, RecipeError, SpiralError
from spiralkit.export import load_state
from spiralkit.spiral.recipe import Recipe, parse_recipe
from spiralkit.report import SCHEMA, Report
from spiralkit.spiral.runner import Spiral, load_run_state

BASE = """\
name: tiny
seed: 1
threads: 1
model: {name: mlp, kwargs: {in_features: 64, widths: [64]}}
data: {name: digits, batch_size: 64, val_fraction: 0.2}
train: {epochs: 8, optimizer: {name: adam, lr: 0.01}}
prune: {target_sparsity: 0.8, schedule: {kind: agp, rounds: 2}}
recover: {kind: distill, train: {epochs: 3, optimizer: {name: sgd, lr: 0.05}}}
targets: {max_metric_drop: 3.0, min_step: 0.05, max_rounds: 6}
measure: {repeats: 3, warmup: 1}
"""


def recipe(**sections: str) -> Recipe:
    text = BASE
    for key, value in sections.items():
        lines = [line for line in text.splitlines() if not line.startswith(f"{key}:")]
        text = "\n".join(lines) + f"\n{key}: {value}\n"
    return parse_recipe(text)


def quiet() -> Console:
    return Console(quiet=True)


def test_spiral_reaches_target_and_writes_report(tmp_path: Path) -> None:
    report = Spiral(recipe()).run(tmp_path / "run", console=quiet())
    data = json.loads((tmp_path / "run" / "report.json").read_text())
    assert data["schema"] == SCHEMA
    assert data["task"] == {"metric": "accuracy", "higher_is_better": True}
    metric_keys = {"metric", "params", "nonzero_params", "sparsity", "size_bytes", "macs", "latency_ms"}
    for m in (data["baseline"], data["final"], *data["rounds"]):
        assert metric_keys <= set(m)
    for r in data["rounds"]:
        assert {"index", "accepted", "seconds"} <= set(r)
    assert report.final is not None and report.stopped and "target sparsity" in report.stopped
    assert [r.accepted for r in report.rounds] == [True, True]
    # 80% of the weights pruned; biases stay, so the model as a whole is a little less sparse.
    assert 0.75 < report.final.sparsity < 0.8
    assert report.final.nonzero_params < report.baseline.nonzero_params / 4
    assert report.final.size_bytes < report.baseline.size_bytes
    assert report.baseline.metric - report.final.metric <= 5.0
    weights = load_state(tmp_path / "run" / "model.safetensors")
    assert (weights["fc1.weight"] == 0).float().mean() > 0.5
    assert "| final |" in (tmp_path / "run" / "report.md").read_text()
    assert Report.from_json((tmp_path / "run" / "report.json").read_text()) == report


def test_forced_metric_drop_rolls_back_and_halves_the_step(tmp_path: Path) -> None:
    # No recovery and no tolerance: pruning 95% at once must lose accuracy and be rolled back.
    r = recipe(
        prune="{target_sparsity: 0.95, schedule: one-shot}",
        recover="{kind: finetune, train: {epochs: 0}}",
        targets="{max_metric_drop: 0.0, min_step: 0.2, max_rounds: 5}",
    )
    report = Spiral(r).run(tmp_path / "run", console=quiet())
    first = report.rounds[0]
    assert not first.accepted and first.reason.startswith("val drop")
    assert report.rounds[1].target == pytest.approx(0.95 / 2)
    assert report.final is not None
    rejected = [x for x in report.rounds if not x.accepted]
    assert rejected, "at least one round must have been rolled back"
    if not any(x.accepted for x in report.rounds):
        assert report.final.nonzero_params == report.baseline.nonzero_params
        assert report.final.metric == report.baseline.metric


def test_nan_loss_rolls_back(tmp_path: Path) -> None:
    r = recipe(
        recover="{kind: finetune, train: {epochs: 1, optimizer: {name: sgd, lr: 1.0e+30}}}",
        targets="{max_metric_drop: 100.0, min_step: 0.05, max_rounds: 2}",
    )
    report = Spiral(r).run(tmp_path / "run", console=quiet())
    assert [x.accepted for x in report.rounds] == [False, False]
    assert all(x.reason.startswith("non-finite loss") for x in report.rounds)
    assert report.stopped == ("max_rounds 2 reached (the last round's recovery diverged: non-finite loss; "
                              "lower recipe key 'recover.train.optimizer.lr')")
    assert report.final is not None and report.final.nonzero_params == report.baseline.nonzero_params
    state = load_run_state(tmp_path / "run")
    assert state.scale == 0.25 and state.checkpoint is None


def test_a_stop_below_min_step_after_a_diverged_round_names_the_learning_rate(tmp_path: Path) -> None:
    r = recipe(
        recover="{kind: finetune, train: {epochs: 1, optimizer: {name: sgd, lr: 1.0e+30}}}",
        targets="{max_metric_drop: 100.0, min_step: 0.4, max_rounds: 5}",  # 0.7, then 0.35: below it
    )
    report = Spiral(r).run(tmp_path / "run", console=quiet())
    assert len(report.rounds) == 1 and report.rounds[0].reason == "non-finite loss"
    assert report.stopped is not None and report.stopped.startswith("next step")
    assert report.stopped.endswith("(the last round's recovery diverged: non-finite loss; "
                                   "lower recipe key 'recover.train.optimizer.lr')")


def test_a_stop_after_a_kept_round_names_no_learning_rate(tmp_path: Path) -> None:
    report = Spiral(recipe(targets="{max_metric_drop: 100.0, min_step: 0.05, max_rounds: 1}")).run(
        tmp_path / "run", console=quiet())
    assert report.rounds[-1].accepted and report.stopped is not None and "diverged" not in report.stopped


def test_resume_after_interruption_gives_the_same_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = Spiral(recipe()).run(tmp_path / "ref", console=quiet())

    import spiralkit.spiral.runner as runner

    real_train = runner.train
    calls = {"n": 0}

    def dying_train(*args, **kwargs):  # baseline, round 1, then dies inside round 2
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(runner, "train", dying_train)
    with pytest.raises(KeyboardInterrupt):
        Spiral(recipe()).run(tmp_path / "run", console=quiet())
    state = load_run_state(tmp_path / "run")
    assert len(state.rounds) == 1 and state.final is None
    monkeypatch.setattr(runner, "train", real_train)
    resumed = Spiral(recipe()).run(tmp_path / "run", resume=True, console=quiet())
    assert [r.accepted for r in resumed.rounds] == [r.accepted for r in reference.rounds]
    assert resumed.final is not None and reference.final is not None
    assert resumed.final.metric == pytest.approx(reference.final.metric, abs=0.1)
    assert resumed.final.nonzero_params == reference.final.nonzero_params


def test_existing_run_dir_is_not_overwritten(tmp_path: Path) -> None:
    r = recipe(targets="{max_metric_drop: 100.0, min_step: 0.05, max_rounds: 1}")
    Spiral(r).run(tmp_path / "run", console=quiet())
    before = (tmp_path / "run" / "state.json").read_text()
    with pytest.raises(SpiralError, match="already holds a run; resume it with --resume"):
        Spiral(r).run(tmp_path / "run", console=quiet())
    assert (tmp_path / "run" / "state.json").read_text() == before


def test_resume_of_a_non_run_dir(tmp_path: Path) -> None:
    with pytest.raises(SpiralError, match="holds no recipe.yaml"):
        Spiral(recipe()).run(tmp_path, resume=True, console=quiet())


def test_untrained_model_without_training_stage_is_an_error(tmp_path: Path) -> None:
    text = "\n".join(line for line in BASE.splitlines() if not line.startswith("train:"))
    with pytest.raises(RecipeError, match="has no 'model.checkpoint' and the recipe has no 'train' section"):
        Spiral(parse_recipe(text)).run(tmp_path / "run", console=quiet())


def test_threads_are_restored(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    Spiral(recipe(targets="{max_metric_drop: 100.0, min_step: 0.05, max_rounds: 1}")).run(tmp_path / "r", console=quiet())
    assert torch.get_num_threads() == before


def test_quantize_stage_writes_compact_artefact(tmp_path: Path) -> None:
    from spiralkit.quant.compact import load_compressed
    from spiralkit.tasks import Classification, evaluate
    from spiralkit.data import DataSpec, load_data

    r = recipe(quantize="{kind: compact, bits: 5, qat: null}")
    report = Spiral(r).run(tmp_path / "run", console=quiet())
    assert report.pruned is not None and report.final is not None and report.quantization is not None
    assert report.quantization.method == "ptq" and set(report.quantization.bits.values()) == {5}
    artefact = tmp_path / "run" / report.quantization.artefact
    assert report.final.size_bytes == artefact.stat().st_size
    assert report.final.size_bytes < report.pruned.size_bytes / 2
    assert report.final.nonzero_params <= report.pruned.nonzero_params
    # The artefact is the model the report measured.
    splits = load_data(DataSpec(name="digits", batch_size=64, val_fraction=0.2))
    restored = evaluate(Classification(), load_compressed(artefact), splits.test).metric
    assert restored == pytest.approx(report.final.metric)
    assert "| pruned |" in (tmp_path / "run" / "report.md").read_text()


def test_quantization_aware_fallback_beats_ptq_at_two_bits(tmp_path: Path) -> None:
    r = recipe(
        targets="{max_metric_drop: 0.0, min_step: 0.05, max_rounds: 1}",
        quantize="{kind: compact, bits: 2, qat: {kind: distill, train: {epochs: 3, optimizer: {name: sgd, lr: 0.01}}}}",
    )
    report = Spiral(r).run(tmp_path / "run", console=quiet())
    assert report.quantization is not None and report.quantization.method == "qat"


def test_static_int8_stage_runs_on_onnx_runtime(tmp_path: Path) -> None:
    from spiralkit.export.onnx import OrtModel
    from spiralkit.quant.ort import integer_ops

    r = recipe(
        targets="{max_metric_drop: 100.0, min_step: 0.05, max_rounds: 1}",
        quantize="{kind: static-int8, calibration_batches: 4}",
    )
    report = Spiral(r).run(tmp_path / "run", console=quiet())
    assert report.quantization is not None and report.final is not None and report.pruned is not None
    artefact = tmp_path / "run" / report.quantization.artefact
    assert artefact.suffix == ".onnx" and report.final.size_bytes == artefact.stat().st_size
    assert sum(integer_ops(artefact).values()) > 0, "int8 kernels must run, not float ops between Q/DQ"
    assert report.final.params == report.pruned.params > 0
    assert abs(report.final.metric - report.pruned.metric) < 5.0
    assert isinstance(OrtModel(artefact), OrtModel)


def test_mixed_precision_choice_is_in_the_report(tmp_path: Path) -> None:
    r = recipe(
        targets="{max_metric_drop: 100.0, min_step: 0.05, max_rounds: 1}",
        quantize="{kind: compact, bits: {kind: mixed, candidates: [2, 4, 8], average_bits: 4}, qat: null}",
    )
    report = Spiral(r).run(tmp_path / "run", console=quiet())
    assert report.quantization is not None
    bits = report.quantization.bits
    assert set(bits) == {"fc1", "fc2"} and set(bits.values()) <= {2, 4, 8}
    scan = json.loads((tmp_path / "run" / "sensitivity.json").read_text())
    assert scan, "the sensitivity scan is kept next to the report"


def test_static_int8_falls_back_to_qat_exported_as_qdq(tmp_path: Path) -> None:
    import copy

    from spiralkit.data import DataSpec, load_data
    from spiralkit.models import mlp
    from spiralkit.quant.ort import integer_ops
    from spiralkit.spiral.quantize import StageInputs, StaticInt8Stage
    from spiralkit.tasks import Classification, evaluate
    from spiralkit.train import TrainConfig, supervised, train

    data = load_data(DataSpec(name="digits", batch_size=64))
    torch.manual_seed(0)
    model = mlp(in_features=64, widths=(32,), num_classes=10)
    task = Classification()
    train(model, data.train, config=TrainConfig(epochs=3), objective=supervised(task.loss), seed=0)
    config = StaticInt8Stage(calibration_batches=2, qat={"train": {"epochs": 1, "optimizer": {"lr": 0.001}}})
    inputs = StageInputs(
        spec=None, teacher=copy.deepcopy(model).eval(), task=task, train_loader=data.train, masks=None,  # type: ignore[arg-type]
        evaluate=lambda m: evaluate(task, m, data.val).metric,
        baseline_val=1000.0, pruned_val=1000.0, max_metric_drop=0.0,  # nothing is acceptable: QAT must run
        seed=0, directory=tmp_path, example=next(iter(data.val))[0][:1], threads=1,
    )
    result = config.run(model, inputs)
    qat_file = tmp_path / "int8" / "model.qat.onnx"
    assert qat_file.exists(), "the QAT fallback must have run and exported a QDQ model"
    assert sum(integer_ops(qat_file).values()) > 0
    assert result.method in ("ptq", "qat") and result.artefact.exists()


STRUCTURED = "[{kind: structured, measure: macs, target_reduction: 0.6, schedule: {kind: agp, rounds: 2}}]"


def test_structured_rounds_reach_a_macs_target_and_shrink_the_model(tmp_path: Path) -> None:
    from spiralkit.spiral.export import export_run

    r = recipe(prune=STRUCTURED, model="{name: mlp, kwargs: {in_features: 64, widths: [64, 64]}}")
    report = Spiral(r).run(tmp_path / "run", console=quiet())
    assert report.final is not None and report.stopped and "target macs reduction 0.600 reached" in report.stopped
    kept = [x for x in report.rounds if x.accepted]
    assert kept and all(x.progress == "macs reduction" for x in report.rounds)
    assert [x.target for x in report.rounds][-1] == pytest.approx(0.6)
    assert report.final.macs <= 0.4 * report.baseline.macs
    assert report.final.params < report.baseline.params and report.final.sparsity < 0.05  # removed, not zeroed
    assert kept[0].macs > report.final.macs  # per-round MACs recorded, and falling
    weights = load_state(tmp_path / "run" / "model.safetensors")
    assert weights["fc1.weight"].shape[0] < 64
    assert (tmp_path / "run" / "plan.json").exists()
    check = export_run(tmp_path / "run").check  # the recipe's model with the plans replayed loads the weights
    assert check.max_abs_diff < 1e-4


def test_hybrid_recipe_removes_channels_then_prunes_weights_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hybrid = "[{kind: structured, target_reduction: 0.4, schedule: one-shot}, {target_sparsity: 0.5, schedule: one-shot}]"
    r = recipe(prune=hybrid)
    reference = Spiral(r).run(tmp_path / "ref", console=quiet())
    assert [(x.stage, x.progress) for x in reference.rounds] == [(1, "macs reduction"), (2, "sparsity")]
    assert reference.stopped is not None and reference.stopped.startswith("stage 1 (structured): target macs")
    assert "stage 2 (unstructured): target sparsity 0.500 reached" in reference.stopped
    assert reference.final is not None
    assert reference.final.macs <= 0.6 * reference.baseline.macs and reference.final.sparsity > 0.3

    import spiralkit.spiral.runner as runner

    real_train = runner.train
    calls = {"n": 0}

    def dying_train(*args, **kwargs):  # baseline, the structured round, then dies in the unstructured one
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(runner, "train", dying_train)
    with pytest.raises(KeyboardInterrupt):
        Spiral(r).run(tmp_path / "run", console=quiet())
    interrupted = load_run_state(tmp_path / "run")
    assert len(interrupted.rounds) == 1 and interrupted.progress >= 0.4 and interrupted.final is None
    monkeypatch.setattr(runner, "train", real_train)
    resumed = Spiral(r).run(tmp_path / "run", resume=True, console=quiet())
    assert resumed.final is not None
    assert resumed.final.macs == reference.final.macs
    assert resumed.final.nonzero_params == reference.final.nonzero_params
    assert resumed.final.metric == pytest.approx(reference.final.metric, abs=0.1)


def test_bad_plan_file_in_a_round_is_named(tmp_path: Path) -> None:
    r = recipe(prune=STRUCTURED, targets="{max_metric_drop: 100.0, min_step: 0.05, max_rounds: 1}")
    Spiral(r).run(tmp_path / "run", console=quiet())
    state = load_run_state(tmp_path / "run")
    assert state.checkpoint is not None
    (tmp_path / "run" / state.checkpoint / "plan.json").write_text("{not json")
    state.final = None
    (tmp_path / "run" / "state.json").write_text(state.model_dump_json(by_alias=True))
    with pytest.raises(SpiralError, match=r"rounds/001/plan.json: not JSON"):
        Spiral(r).run(tmp_path / "run", resume=True, console=quiet())


@pytest.mark.parametrize("measure", ["params", "latency", "latency, runtime: ort"])
def test_structured_targets_on_params_and_latency(tmp_path: Path, measure: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPIRALKIT_CACHE_DIR", str(tmp_path / "cache"))  # latency tables
    # At batch 1 an MLP's latency is mostly fixed cost; at 256 a 30% cut is within reach.
    reduction = 0.5 if measure == "params" else 0.3
    r = recipe(
        prune=f"{{kind: structured, measure: {measure}, target_reduction: {reduction}, schedule: one-shot}}",
        model="{name: mlp, kwargs: {in_features: 64, widths: [256, 256]}}",
        targets="{max_metric_drop: 100.0, min_step: 0.05, max_rounds: 1}",
        recover="{kind: distill, train: {epochs: 1}}",
        measure="{batch_size: 256, repeats: 5, warmup: 1, clock: cpu}",
    )
    report = Spiral(r).run(tmp_path / "run", console=quiet())
    measure, _, runtime = measure.partition(", runtime: ")
    assert report.final is not None and report.rounds[0].progress == f"{measure} reduction"
    assert report.final.params < report.baseline.params
    if measure == "params":
        assert report.final.params <= 0.5 * report.baseline.params
    else:  # planned from a latency table, the prediction checked by a measurement
        (first,) = report.rounds
        assert first.prediction_runtime == (runtime or "eager") and first.predicted_latency_ms is not None
        assert first.measured_latency_ms is not None and first.measured_latency_ms > 0
        assert list((tmp_path / "cache" / "latency").glob(f"{runtime or 'eager'}-*.json"))


class _Residual(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.fc(x))


def stacked(width: int = 32, depth: int = 4) -> torch.nn.Module:
    """A residual MLP with one stack of ``depth`` blocks, for student tests."""
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, width), torch.nn.ReLU(),
        torch.nn.Sequential(*(_Residual(width) for _ in range(depth))), torch.nn.Linear(width, 10),
    )


def test_student_stage_distils_a_shallow_student_and_exports(tmp_path: Path) -> None:
    from spiralkit.spiral.export import export_run

    r = recipe(
        model="{name: 'tests.spiral.test_runner:stacked'}",
        student="{architecture: {kind: shallow, every: 2}, distill: {kind: distill, train: {epochs: 4, optimizer: {name: adam, lr: 0.005}}}}",
        prune="[]",
    )
    report = Spiral(r, allow_code=True).run(tmp_path / "run", console=quiet())
    assert report.student is not None and report.final is not None and not report.rounds
    assert report.student.params < report.baseline.params and report.student.macs < report.baseline.macs
    assert report.final.metric == report.student.metric
    assert report.baseline.metric - report.student.metric < 15.0
    assert "| student |" in (tmp_path / "run" / "report.md").read_text()
    weights = load_state(tmp_path / "run" / "model.safetensors")
    assert {k for k in weights if k.startswith("3.")} == {"3.0.fc.weight", "3.0.fc.bias", "3.1.fc.weight", "3.1.fc.bias"}
    check = export_run(tmp_path / "run", allow_code=True).check  # rebuilt from the recipe's model and student.json
    assert check.max_abs_diff < 1e-4
    # A second run resumes from the saved student instead of distilling again.
    again = Spiral(r, allow_code=True).run(tmp_path / "run", resume=True, console=quiet())
    assert again.student == report.student
    (tmp_path / "run" / "student.json").write_text('{"spec": {"kind": "shallow"}}')
    with pytest.raises(ModelError, match=r"student.json: not a student layout"):
        export_run(tmp_path / "run", allow_code=True)


def test_structured_rounds_after_a_student_count_the_student_s_reduction(tmp_path: Path) -> None:
    r = recipe(
        model="{name: 'tests.spiral.test_runner:stacked', kwargs: {width: 64}}",
        student="{architecture: {kind: shallow, every: 2}, distill: {kind: distill, train: {epochs: 2, optimizer: {name: adam, lr: 0.005}}}}",
        # The student already has ~39% fewer MACs, past the schedule's first point (0.2): the
        # first round must aim beyond it, at the target.
        prune="{kind: structured, measure: macs, target_reduction: 0.45, schedule: {kind: iterative, step: 0.2}}",
        targets="{max_metric_drop: 100.0, min_step: 0.01, max_rounds: 3}",
    )
    report = Spiral(r, allow_code=True).run(tmp_path / "run", console=quiet())
    assert report.student is not None and report.final is not None
    assert 0.3 < 1 - report.student.macs / report.baseline.macs < 0.45
    assert [x.target for x in report.rounds] == [pytest.approx(0.45)]
    assert report.final.macs <= 0.55 * report.baseline.macs


def test_a_recipe_naming_code_is_refused_without_the_opt_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing is imported: the module named does not even exist, and the error is the opt-in's."""
    r = recipe(model="{name: 'not_a_module_anywhere:build'}")
    with pytest.raises(RecipeError, match=r"key 'model\.name': 'not_a_module_anywhere:build' names Python code .*--allow-code"):
        Spiral(r).run(tmp_path / "run", console=quiet())
    assert not (tmp_path / "run").exists(), "refused before the run directory was made"
    data = recipe(data="{name: 'not_a_module_anywhere:loaders'}")
    with pytest.raises(RecipeError, match=r"key 'data\.name': .*names Python code"):
        Spiral(data).run(tmp_path / "run", console=quiet())


def test_a_target_whole_weights_cannot_hit_exactly_counts_as_reached() -> None:
    from types import SimpleNamespace

    from spiralkit.spiral.runner import REACHED, _stage_step

    r = recipe()
    goal = r.prune[0].goal
    ctx = SimpleNamespace(recipe=r)

    def step(progress: float) -> tuple[float | None, str | None]:
        return _stage_step(SimpleNamespace(stage=0, progress=progress, scale=1.0, stage_accepted=3), ctx)  # type: ignore[arg-type]

    # 0.945 of 430,500 weights is 406,822.5: the nearest whole count is 1.2e-6 short of it.
    assert step(goal - 1.2e-6) == (None, f"target sparsity {goal:.3f} reached")
    target, why = step(goal - 10 * REACHED)
    assert why is None and target == pytest.approx(goal), "a real gap still gets its round"


def test_a_bf16_recovery_distils_from_its_teacher_and_ends_near_the_fp32_one(tmp_path: Path) -> None:
    distill = "{kind: distill, train: {epochs: 3, optimizer: {name: sgd, lr: 0.05}, precision: %s}}"
    plain = Spiral(recipe(recover=distill % "fp32")).run(tmp_path / "fp32", console=quiet())
    mixed = Spiral(recipe(recover=distill % "bf16")).run(tmp_path / "bf16", console=quiet())
    assert mixed.final is not None and plain.final is not None
    assert mixed.baseline.metric == plain.baseline.metric  # the baseline trains in fp32 either way
    assert [r.accepted for r in mixed.rounds] == [True, True]
    assert abs(mixed.final.metric - plain.final.metric) <= 3.0
    fp32, bf16 = (load_state(tmp_path / name / "model.safetensors") for name in ("fp32", "bf16"))
    assert any(not torch.equal(fp32[key], bf16[key]) for key in fp32)  # the recovery did run in bf16
    assert all(tensor.dtype == torch.float32 for tensor in bf16.values())
