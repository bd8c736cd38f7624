"""Post-training int8 quantization that runs on ONNX Runtime's real integer kernels.

One verb, `quantize(model, config, data, example=..., workdir=...)`, dispatched on the
config's type:

* `StaticInt8` — weights **and** activations in int8. The model is exported to ONNX,
  pre-processed (shape inference, graph clean-up), calibrated on a few batches and rewritten
  in the QDQ format: ``QuantizeLinear → DequantizeLinear`` pairs around every quantizable op,
  which ONNX Runtime fuses into integer kernels (``QLinearConv``, ``QGemm``,
  ``QLinearMatMul``, ``QLinearAdd``, ...) when it loads the file. Weights are signed int8,
  symmetric (zero point 0), per output channel by default; activations are **unsigned**
  int8 with an asymmetric range. On x86 this "U8S8" pairing is the one ONNX Runtime's fused
  kernels are built for: on ResNet-18 it ran 2.7x faster than signed activations (which
  leave most convolutions as float ops between Q/DQ pairs). On x86 CPUs *without* VNNI,
  U8S8 saturates in ``VPMADDUBSW``, so ``reduce_range: auto`` (the default) puts the weights
  on 7 bits exactly there (`spiralkit.cpu`).
* `DynamicInt8` — weights in int8, activations quantized on the fly per batch; only
  ``Linear`` (ONNX ``MatMul``/``Gemm``) and ``LSTM`` layers, never convolutions (ONNX
  Runtime's dynamic ``ConvInteger`` is slower than float convolution). GRU layers have no
  dynamic int8 kernel in ONNX Runtime and stay float.

The result is a `QuantizedModel`: the int8 file, the float file it came from, its size,
and an `OrtModel` that `spiralkit.tasks.evaluate` and `spiralkit.measure.measure_latency`
use like any module. `spiralkit.quant.ort.integer_ops` proves which integer kernels run.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import singledispatch
from pathlib import Path
from typing import Annotated, Any, Literal

import onnx
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from spiralkit.cpu import ReduceRange, resolve_reduce_range
from spiralkit.export.onnx import OrtModel, export_onnx
from spiralkit.patterns import first_unmatched
from spiralkit.quant.affine import QuantError
from spiralkit.quant.ort import BatchReader, gemm_to_matmul, nodes_of_modules

__all__ = [
    "DynamicInt8",
    "FLOAT_FILENAME",
    "INT8_FILENAME",
    "QuantConfig",
    "QuantizedModel",
    "StaticInt8",
    "quantize",
]

FLOAT_FILENAME = "model.float.onnx"
INT8_FILENAME = "model.int8.onnx"

_OBSERVERS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}
# ONNX op types dynamic int8 quantizes (after `gemm_to_matmul`): Linear layers and LSTMs.
_DYNAMIC_OPS = ("MatMul", "LSTM")


class StaticInt8(BaseModel):
    """Static int8: weights and activations quantized, activation ranges from calibration.

    Attributes:
        calibration_batches: How many batches of the data to calibrate on (the first ones).
        per_channel: One weight scale per output channel (else one per tensor).
        activation_observer: How activation ranges are chosen from the calibration data:
            ``minmax`` (observed extremes), ``percentile`` (clips outliers at the 99.999th
            percentile of ``|x|``) or ``entropy`` (the range minimising the KL divergence
            between float and quantized histograms).
        keep_float: PyTorch module name patterns (``fnmatch``, e.g. ``"fc2"``,
            ``"layer1.*"``) whose ops stay float. A pattern matching no module is an error.
        reduce_range: Weights on 7 bits (codes within ±64) so that ONNX Runtime's U8S8
            kernels cannot saturate on x86 CPUs without VNNI; ``"auto"`` does it exactly on
            such a CPU (`spiralkit.cpu.int8_saturates`), where full-range weights give wrong
            outputs. A file with full-range weights (False, or ``"auto"`` on a VNNI CPU)
            runs correctly only on VNNI CPUs; True is correct on every CPU.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["static-int8"] = "static-int8"
    calibration_batches: int = Field(default=8, gt=0)
    per_channel: bool = True
    activation_observer: Literal["minmax", "percentile", "entropy"] = "minmax"
    keep_float: tuple[str, ...] = ()
    reduce_range: ReduceRange = "auto"


class DynamicInt8(BaseModel):
    """Dynamic int8: int8 weights, activations quantized per batch at run time.

    Only ``Linear`` and ``LSTM`` layers are quantized (never convolutions); it needs no
    calibration data.

    Attributes:
        per_channel: One weight scale per output feature (else one per tensor).
        keep_float: PyTorch module name patterns (``fnmatch``) whose ops stay float. A
            pattern matching no module is an error.
        reduce_range: 7-bit weights where the U8S8 kernels saturate; as `StaticInt8`'s.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["dynamic-int8"] = "dynamic-int8"
    per_channel: bool = False
    keep_float: tuple[str, ...] = ()
    reduce_range: ReduceRange = "auto"


QuantConfig = Annotated[StaticInt8 | DynamicInt8, Field(discriminator="kind")]


@dataclass(frozen=True)
class QuantizedModel:
    """An int8 ONNX model and where it came from.

    Attributes:
        model: The int8 file loaded in ONNX Runtime, callable like a module.
        path: The int8 ``.onnx`` file (self-contained).
        float_path: The float ``.onnx`` file it was quantized from.
        size_bytes: Size of the int8 file on disk.
    """

    model: OrtModel
    path: Path
    float_path: Path
    size_bytes: int


def quantize(
    model: nn.Module,
    config: StaticInt8 | DynamicInt8,
    data: Iterable[tuple[Tensor, Tensor]] | None,
    *,
    example: Tensor,
    workdir: Path,
    threads: int = 1,
) -> QuantizedModel:
    """Quantize ``model`` to int8 ONNX as ``config`` says (dispatched on its type).

    Writes ``workdir/model.float.onnx`` (the float export) and ``workdir/model.int8.onnx``
    (the result), each atomically; intermediate files go to a temporary directory inside
    ``workdir`` that is removed afterwards. ``model`` itself is not modified.

    Args:
        model: A float model with one tensor input and one tensor output.
        config: `StaticInt8` or `DynamicInt8`.
        data: ``(x, y)`` batches; static int8 calibrates on the first
            ``config.calibration_batches`` inputs (``y`` is ignored). Dynamic int8 needs
            none (pass None).
        example: An example input batch, for the export.
        workdir: Directory of the output files (created if missing).
        threads: ONNX Runtime intra-op threads of the returned `OrtModel`.

    Returns:
        The quantized model and its files.

    Raises:
        QuantError: Unknown config type, no calibration batches, a ``keep_float`` pattern
            that matches no module (or no ONNX op), nothing quantizable, or ONNX Runtime
            failing to pre-process or quantize.
        spiralkit.export.onnx.ExportError: The model cannot be exported.
    """
    return _quantize(config, model, data, example=example, workdir=Path(workdir), threads=threads)


@singledispatch
def _quantize(config: object, model: nn.Module, data: Any, *, example: Tensor, workdir: Path, threads: int) -> QuantizedModel:
    raise QuantError(
        f"unknown quantization config {type(config).__name__}: expected StaticInt8 or DynamicInt8"
    )


@_quantize.register
def _(config: StaticInt8, model: nn.Module, data: Any, *, example: Tensor, workdir: Path, threads: int) -> QuantizedModel:
    _check_patterns(model, config.keep_float)
    batches = _calibration_batches(data, config.calibration_batches)
    workdir.mkdir(parents=True, exist_ok=True)
    float_path = export_onnx(model, example, workdir / FLOAT_FILENAME)
    with tempfile.TemporaryDirectory(prefix=".quant-", dir=workdir) as tmp:
        prepared = _prepare(float_path, Path(tmp))
        excluded = _excluded_nodes(float_path, prepared, config.keep_float, model)
        staged = Path(tmp) / INT8_FILENAME
        _run_ort(
            model,
            float_path,
            lambda: quantize_static(
                prepared,
                staged,
                BatchReader(batches),
                quant_format=QuantFormat.QDQ,
                per_channel=config.per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=excluded,
                calibrate_method=_OBSERVERS[config.activation_observer],
                reduce_range=resolve_reduce_range(config.reduce_range),
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            ),
        )
        return _finish(staged, workdir, float_path, threads)


@_quantize.register
def _(config: DynamicInt8, model: nn.Module, data: Any, *, example: Tensor, workdir: Path, threads: int) -> QuantizedModel:
    _check_patterns(model, config.keep_float)
    workdir.mkdir(parents=True, exist_ok=True)
    float_path = export_onnx(model, example, workdir / FLOAT_FILENAME)
    with tempfile.TemporaryDirectory(prefix=".quant-", dir=workdir) as tmp:
        prepared = _prepare(float_path, Path(tmp))
        gemm_to_matmul(prepared)
        if not any(node.op_type in _DYNAMIC_OPS for node in prepared.graph.node):
            raise QuantError(
                f"dynamic int8 found nothing to quantize in {type(model).__name__}: it quantizes only "
                f"Linear and LSTM layers (never convolutions; use StaticInt8 for those)"
            )
        excluded = _excluded_nodes(float_path, prepared, config.keep_float, model)
        staged = Path(tmp) / INT8_FILENAME
        _run_ort(
            model,
            float_path,
            lambda: quantize_dynamic(
                prepared,
                staged,
                op_types_to_quantize=list(_DYNAMIC_OPS),
                per_channel=config.per_channel,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=excluded,
                reduce_range=resolve_reduce_range(config.reduce_range),
            ),
        )
        return _finish(staged, workdir, float_path, threads)


# --------------------------------------------------------------------------- steps


def _calibration_batches(data: Iterable[Any] | None, count: int) -> list[Tensor]:
    """The inputs of the first ``count`` batches of ``data`` (``(x, y)`` pairs or bare tensors)."""
    if data is None:
        raise QuantError("static int8 needs calibration data, but data is None: no calibration batches")
    batches = [_input_of(batch) for batch in itertools.islice(data, count)]
    if not batches:
        raise QuantError("static int8 needs calibration data, but the data yielded no calibration batches")
    return batches


def _input_of(batch: Any) -> Tensor:
    """``x`` of an ``(x, y)`` batch, or the batch itself when it is a tensor."""
    x = batch if isinstance(batch, Tensor) else batch[0] if isinstance(batch, Sequence) and batch else None
    if not isinstance(x, Tensor):
        raise QuantError(f"calibration batches must be (x, y) tensor pairs or tensors, got {type(batch).__name__}")
    return x


def _check_patterns(model: nn.Module, patterns: Sequence[str]) -> None:
    """Every ``keep_float`` pattern must match at least one module name of ``model``."""
    names = [name for name, _ in model.named_modules() if name]
    if (pattern := first_unmatched(patterns, names)) is not None:
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise QuantError(
            f"keep_float pattern {pattern!r} matches no module of {type(model).__name__}; "
            f"its modules are: {shown or '(none)'}"
        )


def _prepare(float_path: Path, tmp: Path) -> onnx.ModelProto:
    """ONNX Runtime's recommended pre-processing (shape inference, clean-up) of the float file."""
    prepared = tmp / "model.prepared.onnx"
    try:
        quant_pre_process(float_path, prepared)
    except Exception:  # onnxruntime's tools raise many unrelated types
        # Symbolic shape inference fails on some graphs; ONNX Runtime's advice is to skip it.
        try:
            quant_pre_process(float_path, prepared, skip_symbolic_shape=True)
        except Exception as exc:
            raise QuantError(f"ONNX Runtime cannot pre-process {float_path} for quantization: {exc}") from exc
    return onnx.load(str(prepared))


def _excluded_nodes(
    float_path: Path, prepared: onnx.ModelProto, patterns: Sequence[str], model: nn.Module
) -> list[str]:
    """Names of the nodes of ``prepared`` to keep float; each pattern must reach at least one.

    Module scopes are read from the float export: ONNX Runtime's pre-processing keeps node
    names but may drop the exporter's metadata. The prepared graph itself is searched too
    (weight names, and nodes the pre-processing created).
    """
    if not patterns:
        return []
    present = {node.name for node in prepared.graph.node}
    exported = nodes_of_modules(onnx.load(str(float_path)), patterns)
    direct = nodes_of_modules(prepared, patterns)
    excluded: set[str] = set()
    for pattern in patterns:
        nodes = {name for name in exported[pattern] if name in present} | set(direct[pattern])
        if not nodes:
            raise QuantError(
                f"keep_float pattern {pattern!r} matches modules of {type(model).__name__} that have no "
                f"operation in the exported ONNX graph (e.g. Dropout or Identity); nothing to keep float"
            )
        excluded |= nodes
    return sorted(excluded)


def _run_ort(model: nn.Module, float_path: Path, step: Callable[[], object]) -> None:
    """Run an ONNX Runtime quantization call; wrap its failures in a `QuantError`.

    The histogram calibrators ``print`` progress lines; they are swallowed so the CLI's
    own progress display stays readable.
    """
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            step()
    except QuantError:
        raise
    except Exception as exc:  # onnxruntime's quantizer raises many unrelated types
        raise QuantError(f"ONNX Runtime failed to quantize {type(model).__name__} ({float_path}): {exc}") from exc


def _finish(staged: Path, workdir: Path, float_path: Path, threads: int) -> QuantizedModel:
    """Move the int8 file into place and load it."""
    path = workdir / INT8_FILENAME
    os.replace(staged, path)
    return QuantizedModel(
        model=OrtModel(path, threads=threads),
        path=path,
        float_path=float_path,
        size_bytes=path.stat().st_size,
    )
