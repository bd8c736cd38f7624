"""Saving and loading models: dense and sparse safetensors files, the compact artefact, atomic writes."""

from spiralkit.export.compact import compressed_size, load_compressed, quantize_nonzero_, save_compressed
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
    "compressed_size",
    "load_compressed",
    "quantize_nonzero_",
    "save_compressed",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_sparse",
    "load_state",
    "save_sparse",
    "save_weights",
]
