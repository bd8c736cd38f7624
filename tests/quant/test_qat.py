"""Quantization-aware training, prepare and convert: fake quantizers, STE and LSQ gradients, freezing.

Training with QAT and its export to integer kernels: tests/spiral/test_qat.py.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor, nn

from spiralkit.data import DataSplits
from spiralkit.export.onnx import OrtModel
from spiralkit.quant.affine import PerTensor, QuantError, QuantSpec, fake_quantize
from spiralkit.quant.qat import (
    ExportFakeQuant,
    FakeQuant,
    LearnedFakeQuant,
    MinMaxWeightQuant,
    QATConfig,
    QATConv2d,
    QATLinear,
    export_qat_onnx,
    freeze_qat,
    prepare_qat,
)
from spiralkit.quant.ort import integer_ops

INTEGER_CONVS = {"QLinearConv", "ConvInteger"}
INTEGER_LINEARS = {"QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat"}


class TinyCNN(nn.Module):
    """For the 8x8 digits: conv → ReLU → pool → conv → ReLU → flatten → fc → ReLU → fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.relu1(self.conv1(x)))
        x = self.flatten(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(x)))




@pytest.fixture(scope="module")
def trained(digits: DataSplits) -> nn.Module:
    """TinyCNN trained with Adam for 100 steps (half a second; about 95% test accuracy)."""
    torch.manual_seed(0)
    model = TinyCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    steps = 0
    while steps < 100:
        for x, y in itertools.islice(digits.train, 100 - steps):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
    return model.eval()


def _batches(digits: DataSplits, count: int = 4) -> list[tuple[Tensor, Tensor]]:
    return [batch for _, batch in zip(range(count), digits.train, strict=False)]


def assert_runs_on_integer_kernels_like_pytorch(model: nn.Module, path: Path, digits: DataSplits) -> None:
    """The exported QDQ file runs on integer kernels and matches the fake-quantized model."""
    kernels = integer_ops(path)
    assert INTEGER_CONVS & set(kernels) and INTEGER_LINEARS & set(kernels), dict(kernels)
    assert digits.test is not None
    x = next(iter(digits.test))[0]
    with torch.no_grad():
        expected = model.eval()(x)
    actual = OrtModel(path)(x)  # a dynamic batch: 500, not the example's 1
    # Both are on the last layer's output grid, and the fake-quant model adds its bias on the
    # integer kernel's int32 grid; but ONNX Runtime requantizes each accumulator with a float
    # multiplier, so a value within float rounding of a rounding boundary may land one step
    # away (and nudge later layers). Measured: 0.03% of the logits one step off, none more,
    # on the 10,000 MNIST test images with LeNet-5 (bench/qat_vs_ptq.py).
    step = float(model.fc2.output_quant.scale)
    difference = (actual - expected).abs()
    assert float(difference.max()) <= step * (1 + 1e-4)
    assert float((difference > step / 2).float().mean()) < 0.01
    assert float((actual.argmax(1) == expected.argmax(1)).float().mean()) >= 0.995


# --------------------------------------------------------------------------- convert


def test_prepared_8bit_model_exports_to_integer_kernels_matching_pytorch(
    trained: nn.Module, digits: DataSplits, tmp_path: Path
) -> None:
    model = prepare_qat(trained, QATConfig(), calibration_batches=_batches(digits))
    path = export_qat_onnx(model, torch.zeros(1, 1, 8, 8), tmp_path / "prepared.onnx")
    assert_runs_on_integer_kernels_like_pytorch(model, path, digits)


@pytest.mark.parametrize("per_channel", [True, False])
def test_reduced_range_trains_7_bit_weights_and_exports_them_as_int8(trained: nn.Module, digits: DataSplits,
                                                                     tmp_path: Path, per_channel: bool) -> None:
    config = QATConfig(reduce_range=True, per_channel=per_channel)
    assert config.weight_bits == 7 and QATConfig(reduce_range=False).weight_bits == 8
    assert QATConfig(bits=4, reduce_range=True).weight_bits == 4
    model = prepare_qat(trained, config, calibration_batches=_batches(digits))
    assert (model.conv1.weight_quant.qmin, model.conv1.weight_quant.qmax) == (-64, 63)
    x = _batches(digits, 1)[0][0]
    with torch.no_grad():
        assert torch.equal(freeze_qat(model).eval()(x), model.eval()(x))  # clamped weights, int8 quantizer: same values
    path = export_qat_onnx(model, torch.zeros(1, 1, 8, 8), tmp_path / "reduced.onnx")
    assert_runs_on_integer_kernels_like_pytorch(model, path, digits)
    # The file holds the (clamped) float weight and its QuantizeLinear, which ONNX Runtime folds into int8 codes.
    weight = next(numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer if i.name == "conv1.weight")
    scale = model.conv1.weight_quant.scale_of(model.conv1.weight).reshape(-1, 1, 1, 1)
    codes = torch.round(torch.from_numpy(weight.copy()) / scale)
    assert int(codes.abs().max()) <= 64


# --------------------------------------------------------------------------- prepare


def test_prepare_wraps_layers_with_calibrated_quantizers(trained: nn.Module, digits: DataSplits) -> None:
    model = prepare_qat(trained, QATConfig(), calibration_batches=_batches(digits))
    assert isinstance(model.conv1, QATConv2d) and isinstance(model.fc2, QATLinear)
    assert isinstance(trained.conv1, nn.Conv2d)  # the original is not modified
    assert set(model.state_dict()) >= {"conv1.weight", "conv1.bias", "fc2.weight"}
    quant = model.conv2.input_quant
    assert isinstance(quant, FakeQuant) and (quant.qmin, quant.qmax) == (0, 255)
    assert int(quant.zero_point) == 0  # the input of conv2 follows a ReLU: range [0, max]
    assert isinstance(model.conv1.weight_quant, MinMaxWeightQuant)
    weight_scale = model.conv1.weight_quant.scale_of(model.conv1.weight)
    assert weight_scale.shape == (8,)  # per channel
    bias = model.conv2.effective_bias()  # on the int32 accumulator grid s_x·s_w
    assert bias is not None
    codes = bias / (quant.scale * model.conv2.weight_quant.scale_of(model.conv2.weight))
    assert torch.allclose(codes, codes.round(), atol=1e-3) and not torch.equal(bias, model.conv2.bias)
    x = _batches(digits, 1)[0][0]
    with torch.no_grad():
        assert torch.equal(freeze_qat(model).eval()(x), model.eval()(x))


def test_keep_float_layer_is_not_wrapped(trained: nn.Module, digits: DataSplits) -> None:
    model = prepare_qat(trained, QATConfig(keep_float=("fc2",)), calibration_batches=_batches(digits))
    assert type(model.fc2) is nn.Linear
    assert isinstance(model.fc1, QATLinear) and isinstance(model.conv1, QATConv2d)


def test_fake_quant_matches_the_affine_maths() -> None:
    x = torch.linspace(-1.0, 3.0, 101)
    spec = QuantSpec(bits=8, symmetric=False, signed=False, granularity=PerTensor())
    scale, zero_point = torch.tensor(0.0157), torch.tensor(64, dtype=torch.int32)
    quant = FakeQuant(scale, zero_point, qmin=spec.qmin, qmax=spec.qmax, axis=None)
    assert torch.allclose(quant(x), fake_quantize(x, scale, zero_point, spec), atol=1e-6)
    exported = ExportFakeQuant(float(scale), int(zero_point), qmin=0, qmax=255)
    assert torch.equal(exported(x), quant(x))


# --------------------------------------------------------------------------- gradients


def test_ste_gradient_is_one_inside_the_range_and_zero_outside() -> None:
    quant = FakeQuant(torch.tensor(0.1), torch.tensor(0, dtype=torch.int32), qmin=0, qmax=15, axis=None)
    x = torch.tensor([-0.5, 0.0, 0.73, 1.5, 2.0], requires_grad=True)
    quant(x).sum().backward()
    assert x.grad is not None
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_weights_change_after_a_training_step(trained: nn.Module, digits: DataSplits) -> None:
    model = prepare_qat(trained, QATConfig(), calibration_batches=_batches(digits))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    x, y = next(iter(digits.train))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    F.cross_entropy(model(x), y).backward()
    for name in ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    optimizer.step()
    assert not torch.equal(before["conv1.weight"], model.conv1.weight)


def test_lsq_scales_are_learned_and_freeze_exactly(trained: nn.Module, digits: DataSplits) -> None:
    model = prepare_qat(trained, QATConfig(learn_scales=True), calibration_batches=_batches(digits))
    assert isinstance(model.conv1.weight_quant, LearnedFakeQuant)
    scales = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith(".scale")}
    assert {"conv1.weight_quant.scale", "conv1.input_quant.scale", "fc2.output_quant.scale"} <= set(scales)
    x, y = next(iter(digits.train))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    now = dict(model.named_parameters())
    changed = [name for name, old in scales.items() if not torch.equal(old, now[name])]
    assert {"conv1.weight_quant.scale", "conv2.input_quant.scale", "fc1.output_quant.scale"} <= set(changed)

    frozen = freeze_qat(model).eval()
    assert not any(name.endswith(".scale") for name, _ in frozen.named_parameters())
    assert isinstance(frozen.conv1.input_quant, ExportFakeQuant)
    with torch.no_grad():
        assert torch.equal(frozen(x), model.eval()(x))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("field", ["bits", "activation_bits"])
@pytest.mark.parametrize("bits", [1, 9, 16])
def test_bits_out_of_range_are_rejected(field: str, bits: int) -> None:
    with pytest.raises(ValidationError, match=rf"bits must be an integer in 2\.\.8, got {bits}"):
        QATConfig(**{field: bits})


def test_keep_float_pattern_matching_nothing_is_an_error(trained: nn.Module, digits: DataSplits) -> None:
    with pytest.raises(QuantError, match=r"keep_float pattern 'head\*' matches no Conv2d/Linear layer; "
                                         r"layers are: conv1, conv2, fc1, fc2"):
        prepare_qat(trained, QATConfig(keep_float=("head*",)), calibration_batches=_batches(digits))


def test_no_calibration_batches_is_an_error(trained: nn.Module) -> None:
    with pytest.raises(QuantError, match="no calibration batches"):
        prepare_qat(trained, QATConfig(), calibration_batches=[])
    weight_only = prepare_qat(trained, QATConfig(quantize_activations=False), calibration_batches=[])
    assert weight_only.conv1.input_quant is None


def test_model_without_layers_is_an_error() -> None:
    with pytest.raises(QuantError, match=r"Sequential has no nn.Conv2d or nn.Linear submodule"):
        prepare_qat(nn.Sequential(nn.ReLU()), QATConfig(), calibration_batches=[torch.zeros(1, 3)])


def test_exporting_a_float_model_is_an_error(trained: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(QuantError, match="has no QAT layer; prepare it with prepare_qat"):
        export_qat_onnx(trained, torch.zeros(1, 1, 8, 8), tmp_path / "float.onnx")
