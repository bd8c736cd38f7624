"""Affine quantization maths (hand-computed values, round trips, gradients) and observers."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from spiralkit.quant.affine import (
    MIN_SCALE,
    PerChannel,
    PerGroup,
    PerTensor,
    QuantError,
    QuantSpec,
    check_bits,
    choose_qparams,
    dequantize,
    fake_quantize,
    lsq_fake_quantize,
    qparams_from_range,
    quantize,
)
from spiralkit.quant.calibrate import MSE, MinMax, Observer, Percentile, calibrate

# --------------------------------------------------------------------------- hand-computed


def test_asymmetric_int8_hand_computed() -> None:
    # x = [-1, 0, 0.5, 2], signed asymmetric 8 bits: [qmin, qmax] = [-128, 127].
    # s = (2 - (-1)) / 255 = 1/85;  z = qmin - round(-1 / s) = -128 + 85 = -43.
    # q = round(x / s) + z = [-85, 0, 42.5 -> 42 (half to even), 170] - 43 = [-128, -43, -1, 127].
    spec = QuantSpec(bits=8, symmetric=False, signed=True)
    x = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    scale, zero_point = choose_qparams(x, spec)
    assert scale.item() == pytest.approx(1 / 85, rel=1e-7)
    assert zero_point.item() == -43
    q = quantize(x, scale, zero_point, spec)
    assert q.dtype == torch.int8
    assert q.tolist() == [-128, -43, -1, 127]
    # Unsigned: [0, 255], z = 0 + 85 = 85, q = [0, 85, 127, 255].
    unsigned = QuantSpec(bits=8, signed=False)
    scale_u, zero_u = choose_qparams(x, unsigned)
    assert zero_u.item() == 85
    assert quantize(x, scale_u, zero_u, unsigned).tolist() == [0, 85, 127, 255]


def test_symmetric_per_channel_hand_computed() -> None:
    # 4 bits symmetric: codes in [-7, 7], s_c = max|w_c| / 7 -> [1, (all zero), 0.5].
    spec = QuantSpec(bits=4, symmetric=True, granularity=PerChannel(axis=0))
    w = torch.tensor([[7.0, -3.2, 1.4], [0.0, 0.0, 0.0], [3.5, -1.2, 0.7]])
    scale, zero_point = choose_qparams(w, spec)
    assert scale.tolist() == [1.0, MIN_SCALE, 0.5]
    assert zero_point.tolist() == [0, 0, 0]
    q = quantize(w, scale, zero_point, spec)
    assert q.tolist() == [[7, -3, 1], [0, 0, 0], [7, -2, 1]]
    restored = dequantize(q, scale, zero_point, granularity=spec.granularity)
    assert restored.tolist() == [[7.0, -3.0, 1.0], [0.0, 0.0, 0.0], [3.5, -1.0, 0.5]]


@pytest.mark.parametrize(
    ("bits", "symmetric", "signed", "expected"),
    [
        (8, True, True, (-127, 127)),
        (8, False, True, (-128, 127)),
        (8, False, False, (0, 255)),
        (8, True, False, (0, 255)),
        (4, True, True, (-7, 7)),
        (4, False, True, (-8, 7)),
        (2, True, True, (-1, 1)),
        (2, False, False, (0, 3)),
    ],
)
def test_code_ranges(bits: int, symmetric: bool, signed: bool, expected: tuple[int, int]) -> None:
    spec = QuantSpec(bits=bits, symmetric=symmetric, signed=signed)
    assert (spec.qmin, spec.qmax) == expected


def test_range_always_includes_zero() -> None:
    spec = QuantSpec(bits=8, signed=False)
    scale, zero_point = qparams_from_range(2.0, 4.0, spec)  # widened to [0, 4]
    assert scale.item() == pytest.approx(4 / 255)
    assert zero_point.item() == 0
    assert dequantize(quantize(torch.zeros(3), scale, zero_point, spec), scale, zero_point).tolist() == [0, 0, 0]


# --------------------------------------------------------------------------- round trips

SPECS = [
    QuantSpec(bits=8),
    QuantSpec(bits=8, symmetric=True),
    QuantSpec(bits=5, signed=False),
    QuantSpec(bits=3, symmetric=True, granularity=PerChannel(axis=1)),
    QuantSpec(bits=2, granularity=PerGroup(size=3)),
    QuantSpec(bits=4, symmetric=True, granularity=PerGroup(size=4)),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}b-{s.granularity.kind}-{s.symmetric}")
def test_codes_round_trip_exactly(spec: QuantSpec) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, generator=generator) * 5
    scale, zero_point = choose_qparams(x, spec)
    codes = torch.randint(spec.qmin, spec.qmax + 1, (3, 7), generator=generator).to(spec.code_dtype)
    restored = dequantize(codes, scale, zero_point, granularity=spec.granularity)
    assert torch.equal(quantize(restored, scale, zero_point, spec), codes)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}b-{s.granularity.kind}-{s.symmetric}")
def test_error_at_most_half_a_step(spec: QuantSpec) -> None:
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(1)) * 3
    scale, zero_point = choose_qparams(x, spec)
    restored = dequantize(quantize(x, scale, zero_point, spec), scale, zero_point, granularity=spec.granularity)
    from spiralkit.quant.affine import expand_qparam

    step = expand_qparam(scale, x.shape, spec.granularity)
    assert bool(((x - restored).abs() <= step / 2 * (1 + 1e-5)).all())


def test_per_group_with_a_short_last_group() -> None:
    spec = QuantSpec(bits=4, symmetric=True, granularity=PerGroup(size=2))
    # Groups [3.5, -7 | 1.75, 0.5 | 7] and [0, 0 | 0, 0 | -3.5]; s = max|x| / 7 per group.
    x = torch.tensor([[3.5, -7.0, 1.75, 0.5, 7.0], [0.0, 0.0, 0.0, 0.0, -3.5]])
    scale, zero_point = choose_qparams(x, spec)
    assert scale.shape == (2, 3)
    assert scale.tolist() == [[1.0, 0.25, 1.0], [MIN_SCALE, MIN_SCALE, 0.5]]
    q = quantize(x, scale, zero_point, spec)
    assert q[0].tolist() == [4, -7, 7, 2, 7]  # 3.5 -> 4 (half to even)
    assert q[1].tolist() == [0, 0, 0, 0, -7]


def test_constant_and_zero_tensors() -> None:
    spec = QuantSpec(bits=8)
    zeros = torch.zeros(4, 3)
    scale, zero_point = choose_qparams(zeros, spec)
    assert scale.item() > 0
    q = quantize(zeros, scale, zero_point, spec)
    assert torch.equal(dequantize(q, scale, zero_point), zeros)
    constant = torch.full((5,), 3.7)
    scale, zero_point = choose_qparams(constant, spec)
    q = quantize(constant, scale, zero_point, spec)
    assert bool((q == spec.qmax).all())  # the end of the grid
    restored = dequantize(q, scale, zero_point)
    assert torch.allclose(restored, constant, rtol=1e-6, atol=0)
    assert torch.equal(quantize(restored, scale, zero_point, spec), q)


def test_all_zero_channel_is_exact() -> None:
    spec = QuantSpec(bits=8, granularity=PerChannel(axis=0))
    w = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    scale, zero_point = choose_qparams(w, spec)
    restored = dequantize(quantize(w, scale, zero_point, spec), scale, zero_point, granularity=spec.granularity)
    assert restored[0].tolist() == [0.0, 0.0]
    assert scale[0].item() > 0


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bits", [1, 9, 0])
def test_bad_bits_name_the_value(bits: int) -> None:
    with pytest.raises(ValidationError, match=f"bits must be an integer in 2..8, got {bits}"):
        QuantSpec(bits=bits)
    with pytest.raises(QuantError, match=f"got {bits}"):
        check_bits(bits)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_names_the_tensor(bad: float) -> None:
    spec = QuantSpec()
    x = torch.tensor([1.0, bad, 2.0])
    with pytest.raises(QuantError, match=r"'fc1.weight': 1 of 3 values are NaN or infinite"):
        choose_qparams(x, spec, name="fc1.weight")
    with pytest.raises(QuantError, match="'fc1.weight'"):
        quantize(x, torch.tensor(0.1), torch.tensor(0), spec, name="fc1.weight")
    with pytest.raises(QuantError, match="'act'"):
        fake_quantize(x, torch.tensor(0.1), torch.tensor(0), spec, name="act")


def test_qparam_shape_mismatch_is_an_error() -> None:
    message = r"per-tensor quantization of a \(2, 3\) tensor needs scale/zero-point shape \(\)"
    with pytest.raises(QuantError, match=message):
        dequantize(torch.zeros(2, 3, dtype=torch.int8), torch.ones(2), torch.zeros(2, dtype=torch.int32))


def test_channel_axis_out_of_range() -> None:
    spec = QuantSpec(granularity=PerChannel(axis=2))
    with pytest.raises(QuantError, match="axis 2 is out of range for tensor 'w' with 2 dims"):
        choose_qparams(torch.ones(2, 2), spec, name="w")


# --------------------------------------------------------------------------- gradients


def test_fake_quantize_value_and_straight_through_gradient() -> None:
    spec = QuantSpec(bits=3, symmetric=True)  # codes [-3, 3]
    scale, zero_point = torch.tensor(0.5), torch.tensor(0)
    x = torch.tensor([-3.0, -0.6, 0.2, 0.9, 5.0], requires_grad=True)
    out = fake_quantize(x, scale, zero_point, spec)
    assert torch.equal(out, dequantize(quantize(x, scale, zero_point, spec), scale, zero_point))
    out.sum().backward()
    assert x.grad is not None
    # -3/0.5 = -6 and 5/0.5 = 10 are clamped: no gradient; inside the range: identity.
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_lsq_scale_gradient_matches_the_formula() -> None:
    spec = QuantSpec(bits=3, symmetric=True)  # Q_N = Q_P = 3, z = 0
    scale = torch.tensor(0.5, requires_grad=True)
    x = torch.tensor([-3.0, -0.6, 0.2, 0.9, 5.0], requires_grad=True)
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    out = lsq_fake_quantize(x, scale, torch.tensor(0), spec)
    assert torch.equal(out, fake_quantize(x, scale, torch.tensor(0), spec))
    (out * upstream).sum().backward()
    # ∂x̂/∂s: below -> -Q_N = -3; inside -> round(v) - v with v = x/s = -1.2, 0.4, 1.8
    # (0.2, -0.4, 0.2); above -> Q_P = 3. Weighted: -3·1 + 0.2·2 - 0.4·3 + 0.2·4 + 3·5 = 12,
    # times g = 1 / sqrt(N · Q_P) = 1 / sqrt(15).
    assert scale.grad is not None and x.grad is not None
    assert scale.grad.item() == pytest.approx(12 / math.sqrt(15), rel=1e-5)
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]


def test_lsq_per_channel_gradient_scaling_counts_elements_per_channel() -> None:
    spec = QuantSpec(bits=3, symmetric=True, granularity=PerChannel(axis=0))
    scale = torch.tensor([0.5, 0.5], requires_grad=True)
    x = torch.tensor([[5.0, 5.0], [0.2, 0.2]])
    lsq_fake_quantize(x, scale, torch.zeros(2, dtype=torch.int32), spec).sum().backward()
    assert scale.grad is not None
    # Row 0 clamps at Q_P = 3 twice; row 1: (0 - 0.4) twice. g = 1 / sqrt(2 · 3).
    assert scale.grad.tolist() == pytest.approx([6 / math.sqrt(6), -0.8 / math.sqrt(6)], rel=1e-5)


# --------------------------------------------------------------------------- observers


def test_min_max_over_two_batches() -> None:
    observer = Observer(MinMax(), name="act")
    observer.update(torch.tensor([-1.0, 2.0]))
    observer.update(torch.tensor([-3.0, 1.0]))
    spec = QuantSpec(bits=8)
    scale, zero_point = observer.qparams(spec)
    expected = qparams_from_range(-3.0, 2.0, spec)
    assert torch.equal(scale, expected[0]) and torch.equal(zero_point, expected[1])


def test_percentile_hand_computed_and_clips_an_outlier() -> None:
    spec = QuantSpec(bits=8, signed=False)
    values = torch.arange(101, dtype=torch.float32)  # 0..100: the q-th percentile is q
    scale, _ = calibrate(values, Percentile(q=90), spec)
    assert scale.item() == pytest.approx(90 / 255)
    x = torch.linspace(-1, 1, 10_001)
    x[0] = 1000.0
    clipped, _ = calibrate(x, Percentile(q=99.9), QuantSpec(bits=8, symmetric=True))
    full, _ = calibrate(x, MinMax(), QuantSpec(bits=8, symmetric=True))
    assert clipped.item() <= 1.0 / 127 + 1e-6
    assert full.item() == pytest.approx(1000 / 127)


def test_mse_beats_min_max_on_a_heavy_tailed_tensor() -> None:
    torch.manual_seed(0)
    x = torch.distributions.StudentT(2.0).sample((4000,))
    spec = QuantSpec(bits=4)

    def error(method: MinMax | MSE) -> float:
        scale, zero_point = calibrate(x, method, spec)
        return float(((fake_quantize(x, scale, zero_point, spec) - x) ** 2).sum())

    assert error(MSE(grid=50)) < 0.95 * error(MinMax())


def test_per_channel_activation_observer() -> None:
    observer = Observer(MSE(grid=10), granularity=PerChannel(axis=1), name="conv1 output")
    observer.update(torch.randn(4, 3, 2, 2))
    observer.update(torch.randn(2, 3, 2, 2))
    scale, zero_point = observer.qparams(QuantSpec(bits=8, granularity=PerChannel(axis=1)))
    assert scale.shape == zero_point.shape == (3,)
    with pytest.raises(QuantError, match="'conv1 output'.*scale shape \\(5,\\)"):
        observer.update(torch.randn(4, 5, 2, 2))
    with pytest.raises(QuantError, match="collected per-channel statistics, but the spec asks for per-tensor"):
        observer.qparams(QuantSpec())


def test_reservoir_is_bounded_and_deterministic() -> None:
    def run(seed: int) -> tuple[torch.Tensor, int]:
        observer = Observer(Percentile(q=90), max_samples=50, seed=seed)
        generator = torch.Generator().manual_seed(0)
        for _ in range(10):
            observer.update(torch.randn(20, generator=generator))
        return observer.qparams(QuantSpec())[0], observer.stored_samples

    first, stored = run(seed=3)
    assert stored == 50
    assert torch.equal(first, run(seed=3)[0])


def test_empty_calibration_is_an_error() -> None:
    observer = Observer(Percentile(), name="fc1 input")
    observer.update(torch.empty(0))
    with pytest.raises(QuantError, match="no calibration data was observed for fc1 input"):
        observer.qparams(QuantSpec())


def test_observer_rejects_nan_naming_it() -> None:
    with pytest.raises(QuantError, match="'fc2 input'"):
        Observer(name="fc2 input").update(torch.tensor([0.0, float("nan")]))


def test_granularity_and_observer_configs_parse_from_strings() -> None:
    spec = QuantSpec.model_validate({"bits": 4, "granularity": "per-tensor"})
    assert spec.granularity == PerTensor()
    assert QuantSpec.model_validate({"granularity": {"kind": "per-group", "size": 8}}).granularity == PerGroup(size=8)
