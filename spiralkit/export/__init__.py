"""Low-level model files: dense and sparse safetensors, ONNX export and ONNX Runtime, atomic writes.

This package sits below `spiralkit.models` and the algorithm packages and imports none of
them; the compact (pruned + quantized) artefact is quantization's format,
`spiralkit.quant.compact`.
"""

from spiralkit.export.onnx import ExportError, OrtModel, VerifyResult, export_onnx, verify_onnx
from spiralkit.export.weights import (
    atomic_write_bytes,
    atomic_write_text,
    load_sparse,
    load_state,
    save_sparse,
    save_weights,
)

__all__ = [
    "ExportError",
    "OrtModel",
    "VerifyResult",
    "export_onnx",
    "verify_onnx",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_sparse",
    "load_state",
    "save_sparse",
    "save_weights",
]
