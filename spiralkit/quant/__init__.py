"""Quantization: affine maths, calibration, weight-only, Deep Compression's compact artefact.

This package's namespace holds the maths that everything else builds on (affine
quantization, observers, weight-only layers), Deep Compression's non-zero-weight quantizer
(`spiralkit.quant.nonzero`) and its storage format, the compact artefact
(`spiralkit.quant.compact`: `save_compressed` / `load_compressed`). The model-level verbs
live in their modules, imported by path:

* `spiralkit.quant.ptq.quantize` — a model to an int8 ONNX Runtime model (static or dynamic);
* `spiralkit.quant.qat` — quantization-aware training's prepare and convert steps (QDQ export);
* `spiralkit.quant.mixed` — sensitivity scan and per-layer bit widths under a budget.

The spiral's quantize stages, and QAT's training, are in `spiralkit.spiral`.
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
from spiralkit.quant.compact import compressed_size, load_compressed, save_compressed
from spiralkit.quant.nonzero import fake_quantize_nonzero, quantize_nonzero_, weight_bits
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
    "compressed_size",
    "dequantize",
    "fake_quantize",
    "fake_quantize_nonzero",
    "load_compressed",
    "lsq_fake_quantize",
    "pack_int4",
    "qparams_from_range",
    "quantize",
    "quantize_nonzero_",
    "quantize_weights_",
    "save_compressed",
    "unpack_int4",
    "weight_bits",
]
