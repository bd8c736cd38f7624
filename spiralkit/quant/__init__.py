"""Quantization: affine maths, calibration, weight-only, post-training static/dynamic int8.

``quantize`` is the tensor-level affine quantizer; ``quantize_model`` turns a model into an
int8 ONNX Runtime model (static or dynamic, by config type).
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
from spiralkit.quant.mixed import SensitivityTable, choose_bits, sensitivity_scan
from spiralkit.quant.qat import QATConfig, export_qat_onnx, prepare_qat, qat
from spiralkit.quant.ptq import DynamicInt8, QuantizedModel, StaticInt8
from spiralkit.quant.ptq import quantize as quantize_model
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
    "QATConfig",
    "SensitivityTable",
    "choose_bits",
    "export_qat_onnx",
    "prepare_qat",
    "qat",
    "sensitivity_scan",
    "DynamicInt8",
    "QuantizedModel",
    "StaticInt8",
    "quantize_model",
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
