"""Quantization: affine maths, calibration, weight-only, post-training static/dynamic int8.

This package's namespace holds the maths that everything else builds on (affine
quantization, observers, weight-only layers). The model-level verbs live in their modules,
imported by path — they build on `spiralkit.export`, which itself uses the maths:

* `spiralkit.quant.ptq.quantize` — a model to an int8 ONNX Runtime model (static or dynamic);
* `spiralkit.quant.qat` — quantization-aware training and its QDQ export;
* `spiralkit.quant.mixed` — sensitivity scan and per-layer bit widths under a budget;
* `spiralkit.quant.stage` — the spiral's quantize stage.
"""

from spiralkit.quant.affine import (
    Granularity,
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
from spiralkit.quant.calibrate import MSE, Calibration, MinMax, Observer, Percentile, calibrate
from spiralkit.quant.weight_only import (
    WeightOnlyConfig,
    WeightOnlyConv2d,
    WeightOnlyLinear,
    pack_int4,
    quantize_weights_,
    unpack_int4,
)

__all__ = [
    "MSE",
    "Calibration",
    "Granularity",
    "MinMax",
    "Observer",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "Percentile",
    "QuantError",
    "QuantSpec",
    "WeightOnlyConfig",
    "WeightOnlyConv2d",
    "WeightOnlyLinear",
    "calibrate",
    "check_bits",
    "choose_qparams",
    "dequantize",
    "fake_quantize",
    "lsq_fake_quantize",
    "pack_int4",
    "qparams_from_range",
    "quantize",
    "quantize_weights_",
    "unpack_int4",
]
