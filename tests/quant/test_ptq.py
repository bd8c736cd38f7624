"""Post-training int8 through ONNX Runtime: accuracy, real integer kernels, size, errors."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import numpy_helper
import pytest
import torch
import torch.nn.functional as F
from pydantic import TypeAdapter, ValidationError
from torch import Tensor, nn

from spiralkit.data import DataSplits
from spiralkit.export.onnx import compare_outputs
from spiralkit.models import lenet5, lenet300
from spiralkit.quant.ort import gemm_to_matmul, integer_ops, nodes_of_modules
from spiralkit.quant import QuantError
from spiralkit.quant.ptq import (
    DynamicInt8,
    QuantConfig,
    QuantizedModel,
    StaticInt8,
    quantize,
)
from spiralkit.tasks import Classification, evaluate

QUANTIZED_CONVS = {"QLinearConv", "ConvInteger"}
QUANTIZED_LINEARS = {"QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}


class DigitsNet(nn.Module):
    """A small CNN for the 8x8 digits: two convs, a pool, two linears (and a Dropout)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.drop = nn.Dropout(0.1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x)))))
        return self.fc2(self.relu3(self.fc1(self.drop(self.flatten(x)))))


def _op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def _initializer_types(path: Path) -> dict[str, int]:
    return {init.name: init.data_type for init in onnx.load(str(path)).graph.initializer}


@pytest.fixture(scope="module")
def trained(digits: DataSplits) -> nn.Module:
    """DigitsNet trained with Adam for 300 steps (about a second on one thread)."""
    torch.manual_seed(0)
    model = DigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps = 0
    while steps < 300:
        for x, y in digits.train:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
    return model.eval()


@pytest.fixture(scope="module")
def static_q(trained: nn.Module, digits: DataSplits, tmp_path_factory: pytest.TempPathFactory) -> QuantizedModel:
    return quantize(
        trained, StaticInt8(calibration_batches=4), digits.train,
        example=torch.zeros(1, 1, 8, 8), workdir=tmp_path_factory.mktemp("static"),
    )


# --------------------------------------------------------------------------- static int8


def test_static_int8_keeps_accuracy(trained: nn.Module, static_q: QuantizedModel, digits: DataSplits) -> None:
    assert digits.test is not None
    fp32 = evaluate(Classification(), trained, digits.test)
    int8 = evaluate(Classification(), static_q.model, digits.test)
    assert fp32.metric > 90.0
    assert int8.examples == fp32.examples
    assert int8.metric >= fp32.metric - 3.0


def test_static_int8_runs_integer_conv_and_matmul_kernels(static_q: QuantizedModel) -> None:
    ops = integer_ops(static_q.path)
    assert ops["QLinearConv"] == 2
    assert sum(ops[op] for op in QUANTIZED_LINEARS) == 2
    assert integer_ops(static_q.float_path) == {}  # the float file runs no integer kernel


def test_static_int8_files(static_q: QuantizedModel) -> None:
    assert static_q.path.name == "model.int8.onnx" and static_q.float_path.name == "model.float.onnx"
    assert sorted(p.name for p in static_q.path.parent.iterdir()) == ["model.float.onnx", "model.int8.onnx"]
    assert static_q.size_bytes == static_q.path.stat().st_size
    assert "QuantizeLinear" in _op_types(static_q.path)


def test_module_patterns_map_to_onnx_nodes(static_q: QuantizedModel) -> None:
    selected = nodes_of_modules(onnx.load(str(static_q.float_path)), ["fc*", "conv1", "drop"])
    assert len(selected["fc*"]) == 2  # the two Gemms
    assert len(selected["conv1"]) == 1
    assert selected["drop"] == []  # Dropout exports to nothing in eval mode


def test_lenet5_int8_is_smaller_and_keep_float_keeps_a_layer_float(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = lenet5()
    data = [(torch.randn(8, 1, 28, 28), torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    config = StaticInt8(keep_float=("fc2",), activation_observer="percentile")
    q = quantize(model, config, data, example=torch.randn(1, 1, 28, 28), workdir=tmp_path)
    assert q.float_path.stat().st_size / q.size_bytes >= 3.0
    types = _initializer_types(q.path)
    assert types["fc1.weight_quantized"] == onnx.TensorProto.INT8
    assert types["fc2.weight"] == onnx.TensorProto.FLOAT and "fc2.weight_quantized" not in types
    ops = integer_ops(q.path)
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 1
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert compare_outputs(model(x), q.model(x)).cosine > 0.999


# --------------------------------------------------------------------------- dynamic int8


def test_dynamic_int8_lenet300_uses_integer_matmuls(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = lenet300().eval()
    q = quantize(model, DynamicInt8(per_channel=True), None, example=torch.randn(2, 1, 28, 28), workdir=tmp_path)
    ops = _op_types(q.path)
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
    assert not ops & QUANTIZED_CONVS and "Gemm" not in ops
    assert not set(integer_ops(q.path)) & QUANTIZED_CONVS
    assert sum(integer_ops(q.path)[op] for op in QUANTIZED_LINEARS) == 3
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        assert compare_outputs(model(x), q.model(x)).cosine > 0.999
    assert q.float_path.stat().st_size / q.size_bytes >= 3.0


def test_dynamic_int8_never_quantizes_convs_and_honours_keep_float(tmp_path: Path) -> None:
    q = quantize(lenet5(), DynamicInt8(keep_float=("fc2",)), None, example=torch.randn(2, 1, 28, 28), workdir=tmp_path)
    ops = _op_types(q.path)
    assert "Conv" in ops and not ops & QUANTIZED_CONVS
    assert sum(1 for node in onnx.load(str(q.path)).graph.node if node.op_type == "MatMulInteger") == 1  # fc1 only
    types = _initializer_types(q.path)
    assert types["fc2.weight"] == onnx.TensorProto.FLOAT and types["fc1.weight_quantized"] == onnx.TensorProto.INT8


class TwoLSTMs(nn.Module):
    """``lstm1 → lstm2 → fc`` over sequences of 5 steps of 6 features."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm1 = nn.LSTM(6, 16, batch_first=True)
        self.lstm2 = nn.LSTM(16, 16, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.lstm2(self.lstm1(x)[0])[0][:, -1])


def test_dynamic_int8_quantizes_lstms_and_keeps_one_float(tmp_path: Path) -> None:
    # lstm2 is found through the exporter's module scopes (an LSTM's weights are repacked
    # under new names, and ONNX Runtime's pre-processing drops the scopes from the graph).
    torch.manual_seed(0)
    model = TwoLSTMs().eval()
    q = quantize(model, DynamicInt8(keep_float=("lstm2",)), None, example=torch.randn(2, 5, 6), workdir=tmp_path)
    ops = integer_ops(q.path)
    assert ops["DynamicQuantizeLSTM"] == 1 and sum(ops[op] for op in QUANTIZED_LINEARS) == 1
    assert "LSTM" in _op_types(q.path)  # lstm2, still float
    x = torch.randn(4, 5, 6)
    with torch.no_grad():
        assert compare_outputs(model(x), q.model(x)).cosine > 0.999


def test_dynamic_int8_with_nothing_to_quantize_is_an_error(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with pytest.raises(QuantError, match="dynamic int8 found nothing to quantize in Sequential.*StaticInt8"):
        quantize(model, DynamicInt8(), None, example=torch.randn(2, 1, 6, 6), workdir=tmp_path)


def test_gemm_to_matmul_is_exact() -> None:
    weight = onnx.numpy_helper.from_array(torch.randn(3, 4).numpy(), "w")
    bias = onnx.numpy_helper.from_array(torch.randn(3).numpy(), "b")
    node = onnx.helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)
    graph = onnx.helper.make_graph(
        [node], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
        [weight, bias],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    assert gemm_to_matmul(model) == 1
    assert [(n.op_type, n.name) for n in model.graph.node] == [("MatMul", "fc"), ("Add", "fc_bias")]
    x = torch.randn(2, 4)
    w, b = (torch.tensor(onnx.numpy_helper.to_array(init)) for init in (weight, bias))
    transposed = torch.tensor(onnx.numpy_helper.to_array(model.graph.initializer[0]))
    assert transposed.shape == (4, 3)
    torch.testing.assert_close(x @ transposed + b, x @ w.T + b)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("data", [None, [], iter(())])
def test_static_without_calibration_data_is_an_error(data: object, tmp_path: Path) -> None:
    with pytest.raises(QuantError, match="no calibration batches"):
        quantize(lenet300(), StaticInt8(), data, example=torch.randn(2, 784), workdir=tmp_path)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []  # checked before anything is exported


@pytest.mark.parametrize("config", [StaticInt8(keep_float=("fc9",)), DynamicInt8(keep_float=("fc1", "layer*"))])
def test_keep_float_pattern_matching_nothing_is_an_error(config: StaticInt8 | DynamicInt8, tmp_path: Path) -> None:
    data = [(torch.randn(2, 784), torch.zeros(2))]
    with pytest.raises(QuantError, match=r"keep_float pattern '(fc9|layer\*)' matches no module of MLP; its modules are: .*fc1"):
        quantize(lenet300(), config, data, example=torch.randn(2, 784), workdir=tmp_path)


def test_unknown_config_type_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(QuantError, match="unknown quantization config dict: expected StaticInt8 or DynamicInt8"):
        quantize(lenet300(), {"kind": "static-int8"}, None, example=torch.randn(2, 784), workdir=tmp_path)  # type: ignore[arg-type]


def _largest_weight_code(path: Path) -> int:
    """The largest |code| of the file's int8 weight initializers."""
    codes = [numpy_helper.to_array(init) for init in onnx.load(str(path)).graph.initializer
             if init.data_type == onnx.TensorProto.INT8 and len(init.dims) > 1]
    assert codes, "no int8 weight in the file"
    return max(int(abs(c.astype("int32")).max()) for c in codes)


@pytest.mark.parametrize("config", [StaticInt8(calibration_batches=2), DynamicInt8()])
def test_reduce_range_puts_the_weights_on_7_bits_and_still_matches(config: StaticInt8 | DynamicInt8, trained: nn.Module,
                                                                  digits: DataSplits, tmp_path: Path) -> None:
    x = next(iter(digits.train))[0]
    with torch.no_grad():
        expected = trained(x)
    full = quantize(trained, config.model_copy(update={"reduce_range": False}), digits.train,
                    example=torch.zeros(1, 1, 8, 8), workdir=tmp_path / "full")
    reduced = quantize(trained, config.model_copy(update={"reduce_range": True}), digits.train,
                       example=torch.zeros(1, 1, 8, 8), workdir=tmp_path / "reduced")
    assert _largest_weight_code(full.path) == 127  # symmetric: each scale's largest weight is ±127
    assert _largest_weight_code(reduced.path) <= 64  # 255 · 64 · 2 fits VPMADDUBSW's 16-bit lane
    assert compare_outputs(expected, reduced.model(x)).cosine > 0.999  # on every CPU, VNNI or not


def test_bad_config_values_are_rejected() -> None:
    with pytest.raises(ValidationError, match="reduce_range"):
        StaticInt8(reduce_range="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="calibration_batches"):
        StaticInt8(calibration_batches=0)
    with pytest.raises(ValidationError, match="activation_observer"):
        StaticInt8(activation_observer="mse")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="bogus"):
        DynamicInt8(bogus=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        StaticInt8().per_channel = False  # type: ignore[misc]


def test_configs_parse_by_kind() -> None:
    adapter = TypeAdapter(QuantConfig)
    assert adapter.validate_python({"kind": "dynamic-int8"}) == DynamicInt8()
    assert adapter.validate_python({"kind": "static-int8", "keep_float": ["fc2"]}) == StaticInt8(keep_float=("fc2",))
    with pytest.raises(ValidationError, match="kind"):
        adapter.validate_python({"kind": "int4"})
