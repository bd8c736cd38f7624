"""Weight-only int8/int4: packing, the replacement modules and the in-place verb."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from spiralkit.quant.affine import PerChannel, QuantError, QuantSpec, choose_qparams, dequantize, quantize
from spiralkit.quant.weight_only import (
    WeightOnlyConfig,
    WeightOnlyConv2d,
    WeightOnlyLinear,
    pack_int4,
    quantize_weights_,
    unpack_int4,
)


def seeded_linear(in_features: int, out_features: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


# --------------------------------------------------------------------------- int4 packing


def test_pack_int4_layout_by_hand() -> None:
    # Element 2i in the low nibble, 2i+1 in the high nibble, two's complement.
    assert pack_int4(torch.tensor([1, -1], dtype=torch.int8)).tolist() == [0xF1]
    assert pack_int4(torch.tensor([-8, 7, 3], dtype=torch.int8)).tolist() == [0x78, 0x03]


@pytest.mark.parametrize("numel", [0, 1, 2, 15, 16, 33])
def test_int4_round_trip_including_odd_lengths(numel: int) -> None:
    values = torch.arange(numel, dtype=torch.int8) % 16 - 8  # every code from -8 to 7
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (numel + 1) // 2
    assert torch.equal(unpack_int4(packed, numel), values)


def test_int4_packing_errors() -> None:
    with pytest.raises(QuantError, match=r"values must be in \[-8, 7\], got \[0, 8\]"):
        pack_int4(torch.tensor([0, 8]))
    with pytest.raises(QuantError, match="integer tensor"):
        pack_int4(torch.tensor([0.5]))
    with pytest.raises(QuantError, match="2 bytes cannot hold exactly 5 int4 codes"):
        unpack_int4(torch.zeros(2, dtype=torch.uint8), 5)


# --------------------------------------------------------------------------- config


def test_config_defaults_and_validation() -> None:
    assert WeightOnlyConfig(bits=4).group_size == 32
    assert WeightOnlyConfig(bits=8).group_size is None
    assert WeightOnlyConfig(bits=4, group_size=None).group_size is None
    assert WeightOnlyConfig.model_validate({"bits": 4}).group_size == 32
    with pytest.raises(ValidationError, match="bits"):
        WeightOnlyConfig(bits=5)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="group_size"):
        WeightOnlyConfig(bits=4, group_size=0)


# --------------------------------------------------------------------------- modules


def test_int8_linear_weight_is_exactly_the_per_channel_quantized_weight() -> None:
    linear = seeded_linear(20, 6)
    layer = WeightOnlyLinear(linear, WeightOnlyConfig(bits=8))
    assert layer.qweight.dtype == torch.int8 and layer.qweight.shape == (6, 20)
    assert layer.scale.shape == (6,)
    spec = QuantSpec(bits=8, symmetric=True, granularity=PerChannel(axis=0))
    scale, zero_point = choose_qparams(linear.weight, spec)
    codes = quantize(linear.weight, scale, zero_point, spec)
    expected = dequantize(codes, scale, zero_point, granularity=spec.granularity)
    assert torch.equal(layer.weight, expected)


def test_int8_linear_output_error_within_the_rounding_bound() -> None:
    linear = seeded_linear(64, 16)
    layer = WeightOnlyLinear(linear, WeightOnlyConfig(bits=8))
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    error = (layer(x) - linear(x)).abs()
    # |Δy_o| ≤ Σ_i |x_i| · s_o / 2 (each weight is off by at most half a step).
    bound = x.abs().sum(dim=1, keepdim=True) * layer.scale[None, :] / 2
    assert bool((error <= bound + 1e-6).all())
    assert ((layer(x) - linear(x)).norm() / linear(x).norm()).item() < 0.01


def test_int4_group_linear_relative_error_bounded() -> None:
    linear = seeded_linear(80, 24)  # 80 = 2 full groups of 32 + a group of 16
    layer = WeightOnlyLinear(linear, WeightOnlyConfig(bits=4))
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.numel() == 24 * 80 // 2
    assert layer.scale.shape == (24, 3)
    x = torch.randn(32, 80, generator=torch.Generator().manual_seed(2))
    reference = linear(x)
    relative = (layer(x) - reference).norm() / reference.norm()
    assert relative.item() < 0.15
    assert bool((layer.weight - linear.weight).abs().max() <= layer.scale.max() / 2 + 1e-7)


def test_weight_only_conv2d_matches_float_conv() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel_size=3, padding=1, stride=2)
    layer = WeightOnlyConv2d(conv, WeightOnlyConfig(bits=8))
    x = torch.randn(2, 3, 9, 9)
    reference = conv(x)
    assert ((layer(x) - reference).norm() / reference.norm()).item() < 0.01
    assert layer.weight.shape == conv.weight.shape
    reflect = nn.Conv2d(3, 5, kernel_size=3, padding=1, padding_mode="reflect")
    with pytest.raises(QuantError, match="layer 'stem': weight-only Conv2d supports padding_mode='zeros'"):
        WeightOnlyConv2d(reflect, WeightOnlyConfig(bits=8), name="stem")


def test_nan_weight_names_the_layer() -> None:
    linear = seeded_linear(4, 2)
    with torch.no_grad():
        linear.weight[0, 0] = float("nan")
    with pytest.raises(QuantError, match="'fc1.weight'"):
        WeightOnlyLinear(linear, WeightOnlyConfig(bits=8), name="fc1")


# --------------------------------------------------------------------------- the verb


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, kernel_size=3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 40), nn.ReLU(), nn.Linear(40, 3)
    )


def test_quantize_weights_replaces_layers_in_place() -> None:
    model = small_model()
    reference = copy.deepcopy(model)
    x = torch.randn(5, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    bits = quantize_weights_(model, WeightOnlyConfig(bits=4), exclude=("5",))
    assert bits == {"0": 4, "3": 4, "5": 32}
    assert isinstance(model[0], WeightOnlyConv2d)
    assert isinstance(model[3], WeightOnlyLinear)
    assert type(model[5]) is nn.Linear
    assert torch.equal(model[5].weight, reference[5].weight)
    assert "3.weight" not in model.state_dict() and "3.qweight" in model.state_dict()
    relative = (model(x) - reference(x)).norm() / reference(x).norm()
    assert relative.item() < 0.15


def test_exclude_pattern_matching_nothing_is_an_error() -> None:
    message = r"exclude pattern 'head\*' matches no Linear/Conv2d layer; layers are: 0, 3, 5"
    with pytest.raises(QuantError, match=message):
        quantize_weights_(small_model(), WeightOnlyConfig(bits=8), exclude=("head*",))


def test_model_without_layers_is_an_error() -> None:
    with pytest.raises(QuantError, match="no nn.Linear or nn.Conv2d"):
        quantize_weights_(nn.Sequential(nn.ReLU()), WeightOnlyConfig(bits=8))


def test_shared_layer_is_replaced_everywhere() -> None:
    shared = seeded_linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    quantize_weights_(model, WeightOnlyConfig(bits=8))
    assert isinstance(model[0], WeightOnlyLinear) and model[0] is model[2]
