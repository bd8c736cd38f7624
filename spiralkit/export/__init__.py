"""Saving and loading model weights: dense and sparse safetensors files, atomic writes."""

from spiralkit.export.weights import (
    atomic_write_bytes,
    atomic_write_text,
    load_sparse,
    load_state,
    save_sparse,
    save_weights,
)

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "load_sparse",
    "load_state",
    "save_sparse",
    "save_weights",
]
