"""The runtimes ``spiral bench`` times a model on, as an explicit table.

A `Runtime` turns a PyTorch module (or an ``.onnx`` file it was exported or quantized to)
into a `Compiled` callable for one batch size and thread count. Optional runtimes
(OpenVINO) are listed even when their package is missing; `Runtime.missing` then says so and
how to install it, and nothing imports the package until the runtime is used.

Runtimes:

* ``eager`` — PyTorch eager mode under ``torch.inference_mode`` (modules only; the caller sets
  torch's threads, e.g. with `spiralkit.modules.torch_threads`).
* ``ort`` — ONNX Runtime's CPU provider, all graph optimisations (`spiralkit.export.onnx.OrtModel`).
* ``openvino`` — OpenVINO's CPU plugin with ``INFERENCE_PRECISION_HINT=f32``: fp32 maths, so
  its numbers compare with the others'. An int8 (Q/DQ) ``.onnx`` runs on its int8 kernels.
* ``openvino_bf16`` — the same with ``bf16``, OpenVINO's own default on CPUs with bf16
  instructions: near-lossless (report the cosine to fp32), about 2x faster than fp32 there.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from spiralkit.errors import SpiralError
from spiralkit.export.onnx import OrtModel, export_onnx

__all__ = ["RUNTIMES", "BenchError", "Compiled", "Runtime", "openvino_compiled", "runtime", "runtime_status", "runtime_version"]

Compiled = Callable[[Tensor], Tensor]
"""A model ready to run: one input batch in, the first output out (on the CPU)."""


class BenchError(SpiralError):
    """A benchmark cannot run: an unknown or missing runtime, model or run directory."""


@dataclass(frozen=True)
class Runtime:
    """One way of running a model.

    Attributes:
        name: Its key in `RUNTIMES` and on the command line.
        description: What it is, for the table.
        package: The Python package it needs beyond spiralkit's own (None: always there).
        from_module: Compile a module: ``(model, example, workdir, threads) → Compiled``;
            ``workdir`` holds any exported file.
        from_onnx: Compile an ``.onnx`` file: ``(path, example, threads) → Compiled``; None
            when the runtime cannot run ONNX (eager).
    """

    name: str
    description: str
    package: str | None
    from_module: Callable[[nn.Module, Tensor, Path, int], Compiled]
    from_onnx: Callable[[Path, Tensor, int], Compiled] | None

    @property
    def missing(self) -> str | None:
        """Why the runtime cannot run here (its package is not installed), or None."""
        if self.package is None or importlib.util.find_spec(self.package) is not None:
            return None
        return f"not installed (pip install 'spiralkit[{self.package}]')"


# --------------------------------------------------------------------------- eager


def _eager(model: nn.Module, example: Tensor, workdir: Path, threads: int) -> Compiled:
    """``model`` in inference mode. Torch's thread count is the caller's to set (`torch_threads`
    around the whole timing): setting it on every call would be timed too."""
    model = model.eval()

    def run(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return model(x)

    return run


# --------------------------------------------------------------------------- ONNX Runtime


def _ort_onnx(path: Path, example: Tensor, threads: int) -> Compiled:
    return OrtModel(path, threads=threads)


def _ort_module(model: nn.Module, example: Tensor, workdir: Path, threads: int) -> Compiled:
    return _ort_onnx(export_onnx(model, example, workdir / "model.onnx"), example, threads)


# --------------------------------------------------------------------------- OpenVINO


def openvino_compiled(source: Any, example: Tensor, threads: int, *, precision: str | None) -> Compiled:
    """An OpenVINO CPU model (a path or an ``openvino.Model``) reshaped to ``example``'s shape and compiled.

    Args:
        source: An ``.onnx``/``.xml`` path or an ``openvino.Model``.
        example: Its shape is the one compiled for (static shapes are OpenVINO's fast path).
        threads: ``INFERENCE_NUM_THREADS``; one stream, latency hint.
        precision: ``INFERENCE_PRECISION_HINT`` (``"f32"``, ``"bf16"``), or None for
            OpenVINO's own default on this CPU.
    """
    import openvino as ov  # optional: only when the runtime is used

    core = ov.Core()
    model = core.read_model(str(source)) if isinstance(source, (str, Path)) else source
    model.reshape({model.inputs[0].get_any_name(): list(example.shape)})
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    request = core.compile_model(model, "CPU", config).create_infer_request()

    def run(x: Tensor) -> Tensor:
        request.infer({0: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)})
        return torch.from_numpy(np.array(request.get_output_tensor(0).data))

    return run


def _openvino(precision: str) -> tuple[Callable[[nn.Module, Tensor, Path, int], Compiled], Callable[[Path, Tensor, int], Compiled]]:
    def from_onnx(path: Path, example: Tensor, threads: int) -> Compiled:
        return openvino_compiled(path, example, threads, precision=precision)

    def from_module(model: nn.Module, example: Tensor, workdir: Path, threads: int) -> Compiled:
        return from_onnx(export_onnx(model, example, workdir / "model.onnx"), example, threads)

    return from_module, from_onnx


def _runtime_table() -> Mapping[str, Runtime]:
    f32, bf16 = _openvino("f32"), _openvino("bf16")
    runtimes = (
        Runtime("eager", "PyTorch eager, inference mode", None, _eager, None),
        Runtime("ort", "ONNX Runtime CPU, all graph optimisations", None, _ort_module, _ort_onnx),
        Runtime("openvino", "OpenVINO CPU, fp32 precision hint", "openvino", *f32),
        Runtime("openvino_bf16", "OpenVINO CPU, bf16 precision hint (near-lossless)", "openvino", *bf16),
    )
    return MappingProxyType({r.name: r for r in runtimes})


RUNTIMES: Mapping[str, Runtime] = _runtime_table()
"""The runtimes by name (read-only): a new runtime is one `Runtime` line in `_runtime_table`."""


def runtime(name: str) -> Runtime:
    """The runtime called ``name``, installed.

    Raises:
        BenchError: ``name`` is not in `RUNTIMES`, or its package is not installed.
    """
    found = RUNTIMES.get(name)
    if found is None:
        raise BenchError(f"unknown runtime {name!r}; runtimes: {', '.join(RUNTIMES)}")
    if found.missing is not None:
        raise BenchError(f"runtime {name!r} is {found.missing}")
    return found


def runtime_version(name: str) -> str:
    """The version of the package behind runtime ``name`` (``torch``, ``onnxruntime``, ``openvino``), or ``""``."""
    package = {"eager": "torch", "ort": "onnxruntime"}.get(name, RUNTIMES[name].package if name in RUNTIMES else None)
    if package is None or importlib.util.find_spec(package) is None:
        return ""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return ""


def runtime_status() -> dict[str, str]:
    """Every runtime of `RUNTIMES` → its package and version (``onnxruntime 1.31.1``), or why it cannot run here."""
    packages = {"eager": "torch", "ort": "onnxruntime"}
    return {name: r.missing or f"{packages.get(name, r.package)} {runtime_version(name)}".strip()
            for name, r in RUNTIMES.items()}
