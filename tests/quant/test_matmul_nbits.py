"""Weight-only layers exported as ONNX Runtime's int4/int8 ``MatMulNBits`` and run there."""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from spiralkit.export.onnx import OrtModel, verify_onnx
from spiralkit.quant.affine import QuantError
from spiralkit.quant.ort import (
    MATMUL_NBITS,
    MatMulNBitsLinear,
    export_weight_only_onnx,
    matmul_nbits_linear,
    optimized_ops,
    to_matmul_nbits_,
)
from spiralkit.quant.weight_only import WeightOnlyConfig, WeightOnlyLinear, quantize_weights_


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    # 40 inputs: the first layer's last group of 32 is short (padded in MatMulNBits' layout).
    return nn.Sequential(nn.Linear(40, 64), nn.GELU(), nn.Linear(64, 24))


@pytest.fixture(scope="module", params=[4, 8])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, nn.Module, Path]:
    """(float MLP, its weight-only copy, the copy's ONNX file) at 4 and 8 bits, groups of 32."""
    float_model = _mlp()
    model = copy.deepcopy(float_model)
    quantize_weights_(model, WeightOnlyConfig(bits=request.param, group_size=32))
    example = torch.randn(2, 7, 40)  # (batch, sequence, features): MatMulNBits takes any leading dims
    path = export_weight_only_onnx(model, example, tmp_path_factory.mktemp("nbits") / "mlp.onnx")
    return float_model, model, path


def test_the_file_holds_matmul_nbits_with_the_layer_attributes(exported: tuple[nn.Module, nn.Module, Path]) -> None:
    _, model, path = exported
    bits = model[0].config.bits
    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == MATMUL_NBITS]
    assert [n.domain for n in nodes] == ["com.microsoft", "com.microsoft"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    assert attrs == [{"K": 40, "N": 64, "bits": bits, "block_size": 32, "accuracy_level": 0},
                     {"K": 64, "N": 24, "bits": bits, "block_size": 32, "accuracy_level": 0}]


def test_onnx_runtime_runs_matmul_nbits_not_a_float_matmul(exported: tuple[nn.Module, nn.Module, Path]) -> None:
    _, _, path = exported
    ops = optimized_ops(path)
    assert ops[MATMUL_NBITS] == 2
    assert ops["MatMul"] == ops["Gemm"] == ops["DequantizeLinear"] == 0


def test_onnx_runtime_matches_the_dequantized_model_not_the_float_one(exported: tuple[nn.Module, nn.Module, Path]) -> None:
    float_model, model, path = exported
    x = torch.randn(5, 7, 40)
    result = verify_onnx(model, path, x, atol=1e-5, rtol=1e-4)  # raises when they disagree
    assert result.max_abs_diff < 1e-5
    with torch.no_grad():
        quantization_error = (OrtModel(path)(x) - float_model(x)).abs().max().item()
    assert quantization_error > 1e-4  # the file really holds the quantized weights


def test_export_leaves_the_model_unchanged(exported: tuple[nn.Module, nn.Module, Path]) -> None:
    _, model, _ = exported
    assert [type(m) for m in model] == [WeightOnlyLinear, nn.GELU, WeightOnlyLinear]


def test_int4_layout_is_unsigned_low_nibble_first_and_padded_with_the_zero_code() -> None:
    layer = nn.Linear(40, 2, bias=False)
    scale = 0.5
    codes = torch.arange(80).reshape(2, 40) % 15 - 7  # every code -7..7
    with torch.no_grad():
        layer.weight.copy_(codes * scale)
        layer.weight[:, 0] = 7 * scale  # each group's largest |w| is 7 · scale, so the scale is exact
        layer.weight[:, 32] = 7 * scale
    codes = (layer.weight / scale).round().to(torch.int16)
    wo = WeightOnlyLinear(layer, WeightOnlyConfig(bits=4, group_size=32))
    nbits = matmul_nbits_linear(wo)
    assert nbits.b.shape == (2, 2, 16) and nbits.b.dtype == torch.uint8
    assert nbits.scales.shape == (2, 2) and torch.allclose(nbits.scales, torch.full((2, 2), scale))
    # byte j of block 0 = (q[2j] + 8) | (q[2j+1] + 8) << 4
    expected = ((codes[0, 0:32:2] + 8) | ((codes[0, 1:32:2] + 8) << 4)).to(torch.uint8)
    assert torch.equal(nbits.b[0, 0], expected)
    # the second block holds 8 real codes, then 24 zero codes (8): bytes 0x88
    assert torch.equal(nbits.b[1, 1, 4:], torch.full((12,), 0x88, dtype=torch.uint8))
    assert torch.equal(nbits.weight, wo.weight)  # the same weight, exactly


def test_eight_bit_codes_are_one_byte_each_offset_by_128() -> None:
    torch.manual_seed(1)
    wo = WeightOnlyLinear(nn.Linear(16, 3), WeightOnlyConfig(bits=8, group_size=16))
    nbits = matmul_nbits_linear(wo)
    assert nbits.b.shape == (3, 1, 16)
    assert torch.equal(nbits.b.reshape(3, 16).to(torch.int16) - 128, wo.qweight.to(torch.int16))
    assert torch.equal(nbits.weight, wo.weight)


def test_convolutions_export_in_float_beside_matmul_nbits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    quantize_weights_(model, WeightOnlyConfig(bits=4))
    runnable = copy.deepcopy(model)
    assert to_matmul_nbits_(runnable) == {"0": "Conv", "3": MATMUL_NBITS}
    assert isinstance(runnable[3], MatMulNBitsLinear)
    x = torch.randn(3, 1, 8, 8)
    path = export_weight_only_onnx(model, x, tmp_path / "cnn.onnx")
    verify_onnx(model, path, x, atol=1e-5, rtol=1e-4)
    ops = optimized_ops(path)
    assert ops[MATMUL_NBITS] == 1 and ops["Conv"] + ops["FusedConv"] == 1


@pytest.mark.parametrize(("group_size", "shown"), [(None, "one scale per output channel"), (24, "group_size=24"),
                                                   (8, "group_size=8")])
def test_groups_matmul_nbits_cannot_hold_are_refused_naming_the_layer(group_size: int | None, shown: str,
                                                                      tmp_path: Path) -> None:
    model = _mlp()
    quantize_weights_(model, WeightOnlyConfig.model_validate({"bits": 4, "group_size": group_size}))
    with pytest.raises(QuantError, match=rf"layer '0': .*power-of-two size >= 16.*got {shown}"):
        export_weight_only_onnx(model, torch.randn(2, 40), tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_a_model_without_weight_only_linear_is_refused(tmp_path: Path) -> None:
    with pytest.raises(QuantError, match="Sequential holds no WeightOnlyLinear layer"):
        export_weight_only_onnx(_mlp(), torch.randn(2, 40), tmp_path / "float.onnx")


def test_accuracy_level_4_is_written_and_stays_close(tmp_path: Path) -> None:
    model = _mlp()
    quantize_weights_(model, WeightOnlyConfig(bits=4, group_size=32))
    x = torch.randn(4, 40)
    path = export_weight_only_onnx(model, x, tmp_path / "int8act.onnx", accuracy_level=4)
    node = next(n for n in onnx.load(str(path)).graph.node if n.op_type == MATMUL_NBITS)
    assert {a.name: a.i for a in node.attribute}["accuracy_level"] == 4
    assert optimized_ops(path)[MATMUL_NBITS] == 2
    # int8 activations where the CPU has the kernel: close to the dequantized model, not necessarily exact
    assert verify_onnx(model, path, x, atol=0.05, rtol=0.05).cosine > 0.999


def test_an_unknown_accuracy_level_is_refused(tmp_path: Path) -> None:
    model = _mlp()
    quantize_weights_(model, WeightOnlyConfig(bits=4, group_size=32))
    with pytest.raises(QuantError, match=r"accuracy_level must be one of \[0, 1, 2, 3, 4\], got 7"):
        export_weight_only_onnx(model, torch.randn(2, 40), tmp_path / "bad.onnx", accuracy_level=7)


@pytest.mark.slow  # exporting a Llama takes 10-30 s
def test_a_grouped_query_llama_exports_every_projection_as_matmul_nbits(tmp_path: Path) -> None:
    from spiralkit.models.causal_lm import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama(vocab_size=64, hidden_size=32, layers=1, heads=4, kv_heads=2, intermediate_size=64).eval()
    quantize_weights_(model, WeightOnlyConfig(bits=4, group_size=16))
    tokens = torch.randint(0, 64, (2, 12))
    path = export_weight_only_onnx(model, tokens, tmp_path / "llama.onnx")
    assert optimized_ops(path)[MATMUL_NBITS] == 8  # q, k, v, o, gate, up, down and lm_head
    assert verify_onnx(model, path, torch.randint(0, 64, (3, 12)), atol=1e-4, rtol=1e-3).cosine > 0.999999
