"""The end of a run: NaN data named, a diverging QAT falling back, and `export` writing what the report calls final."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from spiralkit.data import DataSpec, DataSplits, TensorLoader, load_data
from spiralkit.errors import SpiralError
from spiralkit.models import mlp
from spiralkit.quant.ort import integer_ops
from spiralkit.spiral.export import export_run
from spiralkit.spiral.quantize import StageInputs, StaticInt8Stage
from spiralkit.spiral.recipe import parse_recipe
from spiralkit.spiral.runner import Spiral
from spiralkit.tasks import Classification, evaluate
import spiralkit.spiral.qat as spiral_qat
from spiralkit.train import NonFiniteLoss, TrainConfig, supervised, train
from tests.spiral.tiny import TINY


def quiet() -> Console:
    return Console(quiet=True)


def test_nan_in_the_training_data_is_named_not_the_learning_rate(tmp_path: Path) -> None:
    data = load_data(DataSpec(name="digits", batch_size=64, val_fraction=0.2), seed=1)
    x, y = data.train._x.clone(), data.train._y.clone()  # noqa: SLF001 - a copy of the real data, spoiled
    x.view(x.shape[0], -1)[70, 3] = float("nan")  # in the second batch
    spoiled = DataSplits(name="digits", train=TensorLoader(x, y, batch_size=64, shuffle=False), val=data.val, test=data.test,
                         input_shape=data.input_shape, num_classes=data.num_classes)
    with pytest.raises(SpiralError, match=r"baseline training cannot work: training batch 1 holds NaN or inf inputs"):
        Spiral(parse_recipe(TINY)).run(tmp_path / "run", data=spoiled, console=quiet())


def test_a_diverging_qat_keeps_the_post_training_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def diverging(*args: object, **kwargs: object) -> None:
        raise NonFiniteLoss("loss is nan at step 3")

    data = load_data(DataSpec(name="digits", batch_size=64))
    torch.manual_seed(0)
    model = mlp(in_features=64, widths=(32,), num_classes=10)
    task = Classification()
    train(model, data.train, config=TrainConfig(epochs=2), objective=supervised(task.loss), seed=0)
    config = StaticInt8Stage(calibration_batches=2, qat={"train": {"epochs": 1}})
    monkeypatch.setattr(spiral_qat, "train", diverging)  # QAT's training loop: its loss turns non-finite
    inputs = StageInputs(
        spec=None, teacher=copy.deepcopy(model).eval(), task=task, train_loader=data.train, masks=None,  # type: ignore[arg-type]
        evaluate=lambda m: evaluate(task, m, data.val).metric,
        baseline_val=1000.0, pruned_val=1000.0, max_metric_drop=0.0,  # nothing is acceptable: QAT must run
        seed=0, directory=tmp_path, example=next(iter(data.val))[0][:1], threads=1,
    )
    result = config.run(model, inputs)  # no exception: the post-training model stands
    assert result.method == "ptq" and result.artefact.name == "model.int8.onnx"
    assert not (tmp_path / "int8" / "model.qat.onnx").exists()


def test_export_of_an_int8_run_is_the_int8_model(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    Spiral(parse_recipe(TINY + "quantize: {kind: static-int8, calibration_batches: 2}\n")).run(run_dir, console=quiet())
    exported = export_run(run_dir)
    assert exported.note.startswith("the int8 model int8/model.int8.onnx (ptq)")
    assert exported.path.read_bytes() == (run_dir / "int8" / "model.int8.onnx").read_bytes()
    assert sum(integer_ops(exported.path).values()) > 0, "integer kernels, not the float model"
    assert exported.check.cosine > 0.99


def test_export_of_a_compact_run_is_its_decoded_model_and_says_so(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    Spiral(parse_recipe(TINY + "quantize: {kind: compact, bits: 4, qat: null}\n")).run(run_dir, console=quiet())
    exported = export_run(run_dir)
    assert "decoded model.spkc weights in float (ONNX has no 4-bit weight type)" in exported.note
    assert exported.check.max_abs_diff < 1e-4


def test_export_refuses_a_run_killed_during_quantization(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    Spiral(parse_recipe(TINY + "quantize: {kind: compact, bits: 4, qat: null}\n")).run(run_dir, console=quiet())
    state = json.loads((run_dir / "state.json").read_text())
    state.update(final=None, pruned=None, quantization=None)  # as a kill between the pruned model and the final
    (run_dir / "state.json").write_text(json.dumps(state))
    with pytest.raises(SpiralError, match=rf"{run_dir} holds no finished run \(it stopped during quantization\): "
                                          rf"resume it with `spiral run --resume {run_dir}` first"):
        export_run(run_dir)


def test_a_diverging_compact_qat_keeps_the_post_training_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from spiralkit.models import ModelSpec  # noqa: PLC0415
    from spiralkit.spiral import quantize as stage  # noqa: PLC0415
    from spiralkit.spiral.quantize import CompactQuant  # noqa: PLC0415

    def diverging(*args: object, **kwargs: object) -> None:
        raise NonFiniteLoss("loss is inf at step 1")

    data = load_data(DataSpec(name="digits", batch_size=64))
    spec = ModelSpec(name="mlp", kwargs={"in_features": 64, "widths": [32], "num_classes": 10})
    torch.manual_seed(0)
    model = mlp(in_features=64, widths=(32,), num_classes=10)
    task = Classification()
    train(model, data.train, config=TrainConfig(epochs=2), objective=supervised(task.loss), seed=0)
    monkeypatch.setattr(stage, "train", diverging)
    inputs = StageInputs(
        spec=spec, teacher=copy.deepcopy(model).eval(), task=task, train_loader=data.train, masks=None,
        evaluate=lambda m: evaluate(task, m, data.val).metric,
        baseline_val=1000.0, pruned_val=1000.0, max_metric_drop=0.0,
        seed=0, directory=tmp_path, example=next(iter(data.val))[0][:1], threads=1,
    )
    result = CompactQuant(bits=3, max_metric_drop=0.0).run(model, inputs)
    assert result.method == "ptq" and result.artefact.exists()
