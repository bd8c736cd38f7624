"""GPTQ: layer error against round-to-nearest, static groups, the sequential verb, and the weight-only file."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor, nn

from spiralkit.errors import StorageError
from spiralkit.layerwise import CalibrationError
from spiralkit.quant.affine import QuantError
from spiralkit.quant.gptq import GPTQConfig, gptq_quantize, quantize_gptq_
from spiralkit.quant.weight_only import (
    WeightOnlyConfig,
    WeightOnlyConv2d,
    WeightOnlyLinear,
    load_weight_only,
    quantize_weights_,
    save_weight_only,
)


def _correlated(rows: int, features: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, features, generator=g) @ torch.randn(features, features, generator=g)) \
        * torch.linspace(0.1, 2.0, features)


def _layer(features: int, out: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(features, out, bias=False)


def _error(layer: nn.Module, reference: nn.Linear, x: Tensor) -> float:
    with torch.no_grad():
        return float((layer(x) - reference(x)).double().pow(2).sum())


@pytest.mark.parametrize(("bits", "group_size", "act_order"),
                         [(3, 16, False), (3, 16, True), (4, 32, False), (4, 8, True), (4, None, True), (8, None, False)])
def test_gptq_layer_error_is_at_most_round_to_nearest(bits: int, group_size: int | None, act_order: bool) -> None:
    x = _correlated(256, 32, seed=bits)
    linear = _layer(32, 12, seed=1)
    config = WeightOnlyConfig(bits=bits, group_size=group_size)
    h = 2 * x.double().T @ x.double() / x.shape[0]
    codes, scale = gptq_quantize(linear.weight, h, config=config, act_order=act_order)
    gptq = WeightOnlyLinear(linear, config, codes=codes, scale=scale)
    rtn = WeightOnlyLinear(linear, config)
    assert _error(gptq, linear, x) <= _error(rtn, linear, x)
    # Static groups: the same scales as round-to-nearest, in the original column order.
    assert torch.equal(gptq.scale, rtn.scale)
    assert int(codes.abs().max()) <= (1 << (bits - 1)) - 1


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest() -> None:
    """A diagonal Hessian gives no other column anything to absorb: every code is the nearest one."""
    linear = _layer(16, 6, seed=2)
    h = torch.diag(torch.linspace(0.5, 3.0, 16, dtype=torch.float64))
    config = WeightOnlyConfig(bits=4, group_size=8)
    codes, _ = gptq_quantize(linear.weight, h, config=config, act_order=True)
    rtn = WeightOnlyLinear(linear, config)
    assert torch.equal(WeightOnlyLinear(linear, config, codes=codes, scale=rtn.scale).qweight, rtn.qweight)


def test_gptq_second_column_absorbs_the_first_ones_error_by_least_squares() -> None:
    """Two columns, computed by hand: q0 = round(w0/s), then w1 ← w1 + (H01/H11)(w0 − q0·s), q1 = round(w1/s)."""
    weight = torch.tensor([[0.30, 0.70], [-0.55, 0.20]])
    h = torch.tensor([[2.0, 1.2], [1.2, 1.0]], dtype=torch.float64)
    config = WeightOnlyConfig(bits=3, group_size=None)  # codes −3..3, scale = max|w| / 3 per row
    codes, scale = gptq_quantize(weight, h, config=config, damp=1e-12)
    for row in range(2):
        w0, w1 = (float(v) for v in weight[row])
        s = max(abs(w0), abs(w1)) / 3
        q0 = round(w0 / s)
        q1 = max(-3, min(3, round((w1 + 1.2 / 1.0 * (w0 - q0 * s)) / s)))
        assert codes[row].tolist() == [q0, q1]
        assert float(scale[row]) == pytest.approx(s, rel=1e-6)


def test_quantize_gptq_replaces_layers_sequentially_and_beats_rtn() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = _correlated(128, 16, seed=4)
    batches = [(x[i : i + 32], None) for i in range(0, 128, 32)]
    gptq, rtn = copy.deepcopy(model), copy.deepcopy(model)
    bits = quantize_gptq_(gptq, GPTQConfig(bits=4, group_size=8, act_order=True, samples=128), batches)
    quantize_weights_(rtn, WeightOnlyConfig(bits=4, group_size=8))
    assert bits == {"0": 4, "2": 4}
    assert isinstance(gptq[0], WeightOnlyLinear) and isinstance(gptq[2], WeightOnlyLinear)
    with torch.no_grad():
        reference = model(x)
        assert float((gptq(x) - reference).pow(2).sum()) < float((rtn(x) - reference).pow(2).sum())


def test_quantize_gptq_handles_convolutions_and_exclusions() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3))
    images = [torch.randn(4, 2, 4, 4) for _ in range(2)]
    bits = quantize_gptq_(model, GPTQConfig(bits=8, samples=8), images, exclude=("3",))
    assert bits == {"0": 8, "3": 32}
    assert isinstance(model[0], WeightOnlyConv2d) and isinstance(model[3], nn.Linear)


def test_gptq_config_defaults_and_errors() -> None:
    assert GPTQConfig(bits=4).group_size == 32 and GPTQConfig(bits=3).group_size == 32
    assert GPTQConfig(bits=8).group_size is None
    assert WeightOnlyConfig(bits=3).group_size == 32
    with pytest.raises(ValidationError, match="bits"):
        GPTQConfig(bits=2)  # type: ignore[arg-type]
    with pytest.raises(QuantError, match="exclude pattern 'head' matches no Linear/Conv2d layer"):
        quantize_gptq_(nn.Sequential(nn.Linear(4, 4)), GPTQConfig(), [torch.randn(2, 4)], exclude=("head",))
    with pytest.raises(CalibrationError, match="calibration batches are empty"):
        quantize_gptq_(nn.Sequential(nn.Linear(4, 4)), GPTQConfig(), [])
    with pytest.raises(QuantError, match="has no nn.Linear or nn.Conv2d"):
        quantize_gptq_(nn.Sequential(nn.ReLU()), GPTQConfig(), [torch.randn(2, 4)])


def test_given_codes_that_do_not_fit_are_refused_with_the_layer() -> None:
    linear = _layer(8, 2, seed=6)
    config = WeightOnlyConfig(bits=4, group_size=4)
    with pytest.raises(QuantError, match=r"layer 'fc': codes \(2, 4\) and scales \(2, 2\) do not fit"):
        WeightOnlyLinear(linear, config, name="fc", codes=torch.zeros(2, 4, dtype=torch.int8), scale=torch.ones(2, 2))
    with pytest.raises(QuantError, match=r"layer 'fc': 4-bit codes must be in \[-7, 7\], got \[0, 9\]"):
        WeightOnlyLinear(linear, config, name="fc", codes=torch.full((2, 8), 9, dtype=torch.int8).index_fill(1, torch.tensor([0]), 0),
                         scale=torch.ones(2, 2))


# --------------------------------------------------------------------------- storage


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_weight_only_file_reloads_bit_exactly(tmp_path, bits: int) -> None:
    torch.manual_seed(7)
    float_model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 5))
    quantized = copy.deepcopy(float_model)
    quantize_gptq_(quantized, GPTQConfig(bits=bits, group_size=6 if bits < 8 else None, act_order=True, samples=8),
                   [torch.randn(4, 2, 4, 4) for _ in range(2)])
    size = save_weight_only(quantized, tmp_path / "m.safetensors")
    reloaded = load_weight_only(tmp_path / "m.safetensors", copy.deepcopy(float_model))
    assert isinstance(reloaded[0], WeightOnlyConv2d) and isinstance(reloaded[3], WeightOnlyLinear)
    for name, tensor in quantized.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    x = torch.randn(3, 2, 4, 4)
    assert torch.equal(reloaded(x), quantized(x))
    assert size < 4 * sum(p.numel() for p in float_model.parameters()) + 2000


def test_weight_only_file_errors_name_the_file_and_layer(tmp_path) -> None:
    quantized = nn.Sequential(nn.Linear(8, 4))
    quantize_weights_(quantized, WeightOnlyConfig(bits=4, group_size=4))
    save_weight_only(quantized, tmp_path / "m.safetensors")
    with pytest.raises(StorageError, match=r"layer '0' holds a weight-only \(4, 8\) weight, the model has a Linear of weight shape \(4, 6\)"):
        load_weight_only(tmp_path / "m.safetensors", nn.Sequential(nn.Linear(6, 4)))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(StorageError, match="junk.safetensors is not a safetensors file"):
        load_weight_only(tmp_path / "junk.safetensors", nn.Sequential(nn.Linear(8, 4)))
    with pytest.raises(QuantError, match="holds no weight-only layer"):
        save_weight_only(nn.Sequential(nn.Linear(2, 2)), tmp_path / "float.safetensors")
