"""Quantization-aware training as a recovery: prepare, train, convert to integer kernels."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from spiralkit.data import DataSplits
from spiralkit.spiral.qat import QATRecovery, qat
from spiralkit.quant.affine import QuantError
from spiralkit.quant.qat import QATConfig, export_qat_onnx
from spiralkit.tasks import Classification, evaluate
from spiralkit.train import OptimizerConfig, TrainConfig
from tests.quant.conftest import digits  # noqa: F401 - the fixture
from tests.quant.test_qat import assert_runs_on_integer_kernels_like_pytorch, trained  # noqa: F401 - a fixture

SHORT = TrainConfig(epochs=1, max_batches=15, optimizer=OptimizerConfig(name="adam", lr=1e-3), lr_schedule="constant")


def _accuracy(model: nn.Module, digits: DataSplits) -> float:  # noqa: F811 - a fixture's name
    assert digits.test is not None
    return evaluate(Classification(), model, digits.test).metric


def test_qat_8bit_exports_to_integer_kernels_matching_pytorch(
    trained: nn.Module, digits: DataSplits, tmp_path: Path  # noqa: F811 - fixtures
) -> None:
    before = copy.deepcopy(trained.state_dict())
    model = qat(trained, QATRecovery(train=SHORT), digits, task=Classification())
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())  # float model untouched
    assert _accuracy(model, digits) >= _accuracy(trained, digits) - 2.0

    path = export_qat_onnx(model, torch.zeros(1, 1, 8, 8), tmp_path / "qat.onnx")
    assert_runs_on_integer_kernels_like_pytorch(model, path, digits)


def test_4bit_qat_trains_and_evaluates_in_pytorch(
    trained: nn.Module, digits: DataSplits, tmp_path: Path  # noqa: F811 - fixtures
) -> None:
    config = QATRecovery(bits=4, quantize_activations=False, train=SHORT)
    model = qat(trained, config, digits, task=Classification())
    assert _accuracy(model, digits) >= _accuracy(trained, digits) - 5.0
    weight = model.conv2.weight_quant(model.conv2.weight).detach()
    scale = model.conv2.weight_quant.scale_of(model.conv2.weight)[:, None, None, None]
    codes = weight / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert int(codes.round().min()) >= -8 and int(codes.round().max()) <= 7
    with pytest.raises(QuantError, match=r"layer 'conv1' has 4-bit weights; only 8-bit"):
        export_qat_onnx(model, torch.zeros(1, 1, 8, 8), tmp_path / "q4.onnx")


def test_recovery_config_keeps_the_recipe_keys_and_quantization_config_has_only_quantization() -> None:
    keys = {"kind", "bits", "activation_bits", "per_channel", "learn_scales", "quantize_activations", "keep_float",
            "reduce_range"}
    assert set(QATConfig.model_fields) == keys
    assert set(QATRecovery.model_fields) == keys | {"calibration_batches", "alpha", "temperature", "train"}
    config = QATRecovery.model_validate({"bits": 8, "alpha": 0.5, "train": {"epochs": 1}})
    assert isinstance(config, QATConfig) and config.alpha == 0.5 and config.train.epochs == 1
    with pytest.raises(ValidationError, match="alpha"):
        QATConfig.model_validate({"alpha": 0.5})
