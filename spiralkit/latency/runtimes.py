"""The runtimes a model is timed on, as one explicit table: a new one is one class and one line.

Both the latency tables and planner (this package) and ``spiral bench`` (`spiralkit.bench`)
take their runtimes from `RUNTIMES`. A `Runtime` runs a model the way it would run in
deployment, in two shapes:

* `Runtime.prepare` — a call without arguments running one forward pass on a fixed input,
  converted once, so that only the runtime's own work is timed (`latency_of`, `interleaved_ms`);
* `Runtime.from_module` / `Runtime.from_onnx` — a `Compiled` callable (a batch in, the first
  output out) from a module or from an ``.onnx`` file it was exported or quantized to (int8
  files), for benchmarks that also compare outputs.

Runtimes:

* ``eager`` — PyTorch eager mode (modules only).
* ``ort`` — ONNX Runtime's CPU provider, all graph optimisations (BatchNorm folded, Conv+ReLU fused).
* ``ort_int8`` — the same provider running the model as spiralkit's static int8 quantizes it
  (`spiralkit.quant.ptq.StaticInt8`: QDQ, unsigned activations, signed per-channel weights),
  so that a plan is made for the integer kernels it will run on. The model is calibrated on
  the example batch alone: good for timing (integer kernels take as long whatever the
  scales), not for accuracy — that is the recipe's quantize stage's job.
* ``openvino`` — OpenVINO's CPU plugin with ``INFERENCE_PRECISION_HINT=f32``: fp32 maths, so
  its numbers compare with the others'. An int8 (Q/DQ) ``.onnx`` runs on its int8 kernels.
* ``openvino_bf16`` — the same with ``bf16``, OpenVINO's own default on CPUs with bf16
  instructions: near-lossless (report the cosine to fp32), about 2x faster than fp32 there.
* ``openvino_int8`` — OpenVINO's CPU plugin running the same int8 graphs as ``ort_int8``
  (blocks as `block_int8_onnx` writes them, whole models quantized by spiralkit's static
  int8): a plan for a model that ships as spiralkit's int8 ``.onnx`` and runs on OpenVINO,
  whose int8 kernels are the fastest here.

OpenVINO is optional: its runtimes are listed even when it is missing, `Runtime.missing` then
says how to install it, and nothing imports it until one of them is used.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Protocol

import numpy as np
import onnx
import onnxruntime
from onnx import numpy_helper
import torch
from torch import Tensor, nn

from spiralkit.errors import PruneError
from spiralkit.export.onnx import INPUT_NAME, OUTPUT_NAME, OrtModel, export_onnx, ort_session
from spiralkit.measure import Clock, Latency, measure_call
from spiralkit.modules import eval_mode
from spiralkit.quant.ort import is_integer_op
from spiralkit.quant.ptq import QuantizedModel, StaticInt8, quantize


__all__ = [
    "RUNTIMES",
    "Compiled",
    "EagerRuntime",
    "LatencyError",
    "OpenVinoBf16Runtime",
    "OpenVinoInt8Runtime",
    "OpenVinoRuntime",
    "OrtInt8Runtime",
    "OrtRuntime",
    "Runtime",
    "block_int8_onnx",
    "block_onnx",
    "get_runtime",
    "interleaved_ms",
    "latency_of",
    "openvino_compiled",
    "runtime_status",
]

Compiled = Callable[[Tensor], Tensor]
"""A model ready to run: one input batch in, the first output out (on the CPU)."""


class LatencyError(PruneError):
    """A latency cannot be measured or planned for (unknown or missing runtime, unreachable target)."""


class Runtime(Protocol):
    """What the latency tables and ``spiral bench`` ask of a runtime.

    Attributes:
        name: Its key in `RUNTIMES`, in recipes (``runtime: ort``) and on the command line.
        description: What it is, for tables.
        package: The Python package that runs it (its version is the runtime's).
        reads_onnx: Whether `from_onnx` can run an ``.onnx`` file (eager cannot).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    package: ClassVar[str]
    reads_onnx: ClassVar[bool]

    @property
    def missing(self) -> str | None:
        """Why the runtime cannot run here (its package is not installed), or None."""
        ...

    def version(self) -> str:
        """The runtime's version: part of a latency table's cache key."""
        ...

    def prepare(self, model: nn.Module, example: Tensor, *, threads: int, scratch: Path) -> Callable[[], object]:
        """A call running one forward pass of ``model`` on ``example``, set up for timing.

        Args:
            model: The model (in eval mode while prepared and run).
            example: The input batch; its shape is fixed for the call.
            threads: Intra-op threads of the runtime.
            scratch: A directory for files the runtime needs while the call lives.
        """
        ...

    def from_module(self, model: nn.Module, example: Tensor, *, threads: int, scratch: Path) -> Compiled:
        """``model`` compiled for ``example``'s shape; ``scratch`` holds any exported file."""
        ...

    def from_onnx(self, path: Path, example: Tensor, *, threads: int) -> Compiled:
        """The ``.onnx`` file compiled for ``example``'s shape.

        Raises:
            LatencyError: The runtime cannot run ONNX files (``reads_onnx`` is False).
        """
        ...


class EagerRuntime:
    """PyTorch eager mode on the CPU (torch's threads are the caller's to set, around the whole timing:
    setting them on every call would be timed too)."""

    name: ClassVar[str] = "eager"
    description: ClassVar[str] = "PyTorch eager, inference mode"
    package: ClassVar[str] = "torch"
    reads_onnx: ClassVar[bool] = False

    @property
    def missing(self) -> str | None:
        """Never: torch is always there."""
        return None

    def version(self) -> str:
        """``torch.__version__``."""
        return str(torch.__version__)

    def prepare(self, model: nn.Module, example: Tensor, *, threads: int, scratch: Path) -> Callable[[], object]:
        """``model(example)`` (`latency_of` runs it in eval and inference mode)."""
        return lambda: model(example)

    def from_module(self, model: nn.Module, example: Tensor, *, threads: int, scratch: Path) -> Compiled:
        """``model`` in eval and inference mode."""
        model = model.eval()

        def run(x: Tensor) -> Tensor:
            with torch.inference_mode():
                return model(x)

        return run

    def from_onnx(self, path: Path, example: Tensor, *, threads: int) -> Compiled:
        """Not possible: eager runs PyTorch modules only."""
        raise LatencyError(f"runtime 'eager' runs PyTorch modules, not ONNX files ({path})")


class OrtRuntime:
    """ONNX Runtime fp32 on the CPU, with all graph optimisations (BatchNorm folded, Conv+ReLU fused).

    A lone block — ``nn.Linear``, or ``nn.Sequential(conv, batch norm, ReLU)`` as latency tables
    time them — is written as ONNX directly (`block_onnx`): the graph `export_onnx` gives it,
    without the exporter's 1-3 s per call, which would make a table of a hundred entries slow.
    """

    name: ClassVar[str] = "ort"
    description: ClassVar[str] = "ONNX Runtime CPU, all graph optimisations"
    package: ClassVar[str] = "onnxruntime"
    reads_onnx: ClassVar[bool] = True

    @property
    def missing(self) -> str | None:
        """Never: onnxruntime is one of spiralkit's own dependencies."""
        return None

    def version(self) -> str:
        """``onnxruntime.__version__``."""
        return str(onnxruntime.__version__)

    def prepare(self, model: nn.Module, example: Tensor, *, threads: int, scratch: Path) -> Callable[[], object]:
        """Export ``model`` at ``example``'s fixed shape, open a session, convert the input once."""
        session = ort_session(_fixed_shape_onnx(model, example, scratch), threads=threads)
        feed = {INPUT_NAME: _numpy(example)}
        return lambda: session.run(None, feed)

    def from_module(self, model: nn.Module, example: Tensor, *, threads: int, scratch: Path) -> Compiled:
        """`export_onnx` of ``model`` (dynamic batch) run by `OrtModel`."""
        return self.from_onnx(export_onnx(model, example, scratch / "model.onnx"), example, threads=threads)

    def from_onnx(self, path: Path, example: Tensor, *, threads: int) -> Compiled:
        """The file run by `OrtModel` (it converts each batch to numpy and the output back)."""
        return OrtModel(path, threads=threads)


class OrtInt8Runtime(OrtRuntime):
    """ONNX Runtime on the CPU running the model in static int8, as spiralkit's quantize stage writes it.

    A lone block (see `OrtRuntime`) is written as its int8 graph directly (`block_int8_onnx`):
    uint8 in and out, as it sits between the other blocks of an int8 network, without the
    quantizer's calibration pass per table entry. A whole model is quantized by
    `spiralkit.quant.ptq.quantize` with `StaticInt8` defaults, calibrated on the example.
    """

    name: ClassVar[str] = "ort_int8"
    description: ClassVar[str] = "ONNX Runtime CPU, spiralkit's static int8 (QDQ)"

    def prepare(self, model: nn.Module, example: Tensor, *, threads: int, scratch: Path) -> Callable[[], object]:
        """The int8 block graph, or the model quantized on ``example``, in a session; the input converted once."""
        path, x = self._int8_file(model, example, scratch, threads)
        session, feed = ort_session(path, threads=threads), {INPUT_NAME: x}
        return lambda: session.run(None, feed)

    def from_module(self, model: nn.Module, example: Tensor, *, threads: int, scratch: Path) -> Compiled:
        """``model`` quantized to static int8 on ``example`` (timing only: one batch calibrates it)."""
        return self._quantized(model, example, scratch, threads).model

    def from_onnx(self, path: Path, example: Tensor, *, threads: int) -> Compiled:
        """An int8 file (Q/DQ nodes or integer ops) run by `OrtModel`.

        Raises:
            LatencyError: The file has no quantized ops: quantize it first (or time it on ``ort``).
        """
        _require_int8(path, self.name, fallback="ort")
        return OrtModel(path, threads=threads)

    def _int8_file(self, model: nn.Module, example: Tensor, scratch: Path, threads: int) -> tuple[Path, np.ndarray]:
        """The file a timing runs and its input: a block's int8 graph (uint8 in), else the quantized model (float in)."""
        if (proto := block_int8_onnx(model)) is not None:
            path = scratch / "model.onnx"
            path.write_bytes(proto.SerializeToString())
            return path, _as_uint8(example)
        return self._quantized(model, example, scratch, threads).path, _numpy(example)

    @staticmethod
    def _quantized(model: nn.Module, example: Tensor, scratch: Path, threads: int) -> QuantizedModel:
        return quantize(model, StaticInt8(calibration_batches=1), [example], example=example, workdir=scratch,
                        threads=threads)


class OpenVinoRuntime:
    """OpenVINO's CPU plugin at a fixed precision hint; models are reshaped to the example's static shape."""

    name: ClassVar[str] = "openvino"
    description: ClassVar[str] = "OpenVINO CPU, fp32 precision hint"
    package: ClassVar[str] = "openvino"
    reads_onnx: ClassVar[bool] = True
    precision: ClassVar[str] = "f32"

    @property
    def missing(self) -> str | None:
        """``not installed (pip install 'spiralkit[openvino]')`` when the package is missing, else None."""
        if importlib.util.find_spec(self.package) is not None:
            return None
        return f"not installed (pip install 'spiralkit[{self.package}]')"

    def version(self) -> str:
        """The installed ``openvino`` distribution's version (read without importing it)."""
        return importlib.metadata.version(self.package)

    def prepare(self, model: nn.Module, example: Tensor, *, threads: int, scratch: Path) -> Callable[[], object]:
        """Export ``model`` at ``example``'s fixed shape, compile it, convert the input once."""
        path = _fixed_shape_onnx(model, example, scratch)
        request = _openvino_request(path, example, threads, precision=self.precision)
        feed = {0: _numpy(example)}
        return lambda: request.infer(feed)

    def from_module(self, model: nn.Module, example: Tensor, *, threads: int, scratch: Path) -> Compiled:
        """`export_onnx` of ``model``, compiled by `openvino_compiled`."""
        return self.from_onnx(export_onnx(model, example, scratch / "model.onnx"), example, threads=threads)

    def from_onnx(self, path: Path, example: Tensor, *, threads: int) -> Compiled:
        """The file compiled by `openvino_compiled` at this runtime's precision."""
        return openvino_compiled(path, example, threads, precision=self.precision)


class OpenVinoBf16Runtime(OpenVinoRuntime):
    """`OpenVinoRuntime` with the ``bf16`` precision hint (near-lossless; fast on CPUs with bf16 instructions)."""

    name: ClassVar[str] = "openvino_bf16"
    description: ClassVar[str] = "OpenVINO CPU, bf16 precision hint (near-lossless)"
    precision: ClassVar[str] = "bf16"


class OpenVinoInt8Runtime(OrtInt8Runtime):
    """OpenVINO's CPU plugin running spiralkit's static int8 graphs: `OrtInt8Runtime`'s files, OpenVINO's kernels.

    The float parts of a file (if any) run at the ``f32`` precision hint, as on `OpenVinoRuntime`.
    """

    name: ClassVar[str] = "openvino_int8"
    description: ClassVar[str] = "OpenVINO CPU, spiralkit's static int8 (QDQ)"
    package: ClassVar[str] = "openvino"
    missing = OpenVinoRuntime.missing
    version = OpenVinoRuntime.version

    def prepare(self, model: nn.Module, example: Tensor, *, threads: int, scratch: Path) -> Callable[[], object]:
        """The int8 block graph, or the model quantized on ``example``, compiled; the input converted once."""
        path, x = self._int8_file(model, example, scratch, threads)
        request, feed = _openvino_request(path, example, threads, precision=OpenVinoRuntime.precision), {0: x}
        return lambda: request.infer(feed)

    def from_module(self, model: nn.Module, example: Tensor, *, threads: int, scratch: Path) -> Compiled:
        """``model`` quantized to static int8 on ``example`` (timing only), compiled by `openvino_compiled`."""
        return self.from_onnx(self._quantized(model, example, scratch, threads).path, example, threads=threads)

    def from_onnx(self, path: Path, example: Tensor, *, threads: int) -> Compiled:
        """An int8 file compiled by `openvino_compiled` (``f32`` hint for any float part).

        Raises:
            LatencyError: The file has no quantized ops: quantize it first (or time it on ``openvino``).
        """
        _require_int8(path, self.name, fallback="openvino")
        return openvino_compiled(path, example, threads, precision=OpenVinoRuntime.precision)


def _require_int8(path: Path, runtime: str, *, fallback: str) -> None:
    """Raise `LatencyError` unless ``path`` holds quantized ops (Q/DQ nodes, or integer ops already fused)."""
    ops = {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}
    if "DequantizeLinear" not in ops and not any(map(is_integer_op, ops)):
        raise LatencyError(f"runtime {runtime!r} runs int8 files, but {path} has no quantized op: "
                           f"quantize it (a quantize stage), or time it on runtime {fallback!r}")


def _numpy(example: Tensor) -> np.ndarray:
    return np.ascontiguousarray(example.detach().cpu().float().numpy())


def _as_uint8(example: Tensor) -> np.ndarray:
    """``example`` quantized to uint8 over its own range (a block's int8 input; the values only need to be plausible)."""
    x = _numpy(example)
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (high - low) / 255 or 1.0
    return np.clip(np.round(x / scale) + round(-low / scale), 0, 255).astype(np.uint8)


def _fixed_shape_onnx(model: nn.Module, example: Tensor, scratch: Path) -> Path:
    """``model`` as ``scratch/model.onnx``: `block_onnx` for a lone block, else `export_onnx` at ``example``'s shape."""
    path = scratch / "model.onnx"
    if (proto := block_onnx(model)) is not None:
        path.write_bytes(proto.SerializeToString())
        return path
    return export_onnx(model, example, path, dynamic_batch=False)


def _openvino_request(source: Any, example: Tensor, threads: int, *, precision: str | None) -> Any:
    """An OpenVINO CPU infer request for ``source`` reshaped to ``example``'s shape (see `openvino_compiled`)."""
    import openvino as ov  # optional: only when the runtime is used

    core = ov.Core()
    model = core.read_model(str(source)) if isinstance(source, (str, Path)) else source
    model.reshape({model.inputs[0].get_any_name(): list(example.shape)})
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    return core.compile_model(model, "CPU", config).create_infer_request()


def openvino_compiled(source: Any, example: Tensor, threads: int, *, precision: str | None) -> Compiled:
    """An OpenVINO CPU model (a path or an ``openvino.Model``) reshaped to ``example``'s shape and compiled.

    Args:
        source: An ``.onnx``/``.xml`` path or an ``openvino.Model``.
        example: Its shape is the one compiled for (static shapes are OpenVINO's fast path).
        threads: ``INFERENCE_NUM_THREADS``; one stream, latency hint.
        precision: ``INFERENCE_PRECISION_HINT`` (``"f32"``, ``"bf16"``), or None for
            OpenVINO's own default on this CPU.
    """
    request = _openvino_request(source, example, threads, precision=precision)

    def run(x: Tensor) -> Tensor:
        request.infer({0: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)})
        return torch.from_numpy(np.array(request.get_output_tensor(0).data))

    return run


def block_onnx(model: nn.Module) -> onnx.ModelProto | None:
    """``model`` as an ONNX graph when it is one block, else None.

    A block is an ``nn.Linear`` (one ``Gemm``) or ``nn.Sequential(ConvNd, BatchNormNd, ReLU)``
    (one ``Conv`` with the batch norm folded into its weights and bias, then ``Relu``) — what
    `export_onnx` writes for them in eval mode. Input ``"input"``, output ``"output"``,
    dynamic shapes (the session sees the real one).
    """
    f32 = onnx.TensorProto.FLOAT
    if isinstance(model, nn.Linear):
        weight = model.weight.detach()
        bias = model.bias.detach() if model.bias is not None else torch.zeros(weight.shape[0])
        nodes = [onnx.helper.make_node("Gemm", [INPUT_NAME, "w", "b"], [OUTPUT_NAME], transB=1)]
        rank = 2
    elif (isinstance(model, nn.Sequential) and len(model) == 3 and isinstance(model[0], nn.modules.conv._ConvNd)
          and isinstance(model[1], nn.modules.batchnorm._BatchNorm) and isinstance(model[2], nn.ReLU)
          and not isinstance(model[0].padding, str)):
        conv, norm = model[0], model[1]
        scale = norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)
        weight = conv.weight.detach() * scale.reshape(-1, *[1] * (conv.weight.dim() - 1))
        bias = norm.bias.detach() - norm.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias.detach() * scale
        pads = list(conv.padding) * 2
        nodes = [
            onnx.helper.make_node("Conv", [INPUT_NAME, "w", "b"], ["conv"], kernel_shape=list(conv.kernel_size),
                                  strides=list(conv.stride), pads=pads, dilations=list(conv.dilation), group=conv.groups),
            onnx.helper.make_node("Relu", ["conv"], [OUTPUT_NAME]),
        ]
        rank = conv.weight.dim()
    else:
        return None
    graph = onnx.helper.make_graph(
        nodes, "block",
        [onnx.helper.make_tensor_value_info(INPUT_NAME, f32, [None] * rank)],
        [onnx.helper.make_tensor_value_info(OUTPUT_NAME, f32, [None] * rank)],
        initializer=[numpy_helper.from_array(weight.float().numpy(), "w"), numpy_helper.from_array(bias.float().numpy(), "b")],
    )
    # IR version 8 (opset 17): what every ONNX Runtime since 1.14 loads, whatever onnx writes by default.
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)


def block_int8_onnx(model: nn.Module) -> onnx.ModelProto | None:
    """``model`` as the int8 graph of one block (see `block_onnx`), or None when it is not one.

    The float block with Q/DQ nodes where spiralkit's static int8 puts them: a uint8 input
    (``DequantizeLinear``), int8 weights per output channel and an int32 bias (each behind a
    ``DequantizeLinear``), a uint8 output (``QuantizeLinear`` after the ReLU). ONNX Runtime
    fuses it into the integer kernel the int8 network runs (``QLinearConv``, ``QGemm``). The
    scales are placeholders (the kernels' time does not depend on them); the weights are the
    block's, rounded.
    """
    proto = block_onnx(model)
    if proto is None:
        return None
    graph = proto.graph
    inits = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    weight, bias = inits["w"], inits["b"]
    x_scale, y_scale = np.float32(1 / 32), np.float32(1 / 16)
    w_scale = (np.abs(weight).reshape(weight.shape[0], -1).max(axis=1) / 127).astype(np.float32)
    w_scale[w_scale == 0] = 1.0
    w_codes = np.clip(np.round(weight / w_scale.reshape(-1, *[1] * (weight.ndim - 1))), -127, 127).astype(np.int8)
    b_scale = (x_scale * w_scale).astype(np.float32)
    b_codes = np.round(bias / b_scale).astype(np.int32)
    constants = {
        "x_scale": np.array(x_scale), "x_zero": np.array(0, np.uint8), "y_scale": np.array(y_scale),
        "y_zero": np.array(0, np.uint8), "w_q": w_codes, "w_scale": w_scale, "w_zero": np.zeros(len(w_scale), np.int8),
        "b_q": b_codes, "b_scale": b_scale, "b_zero": np.zeros(len(b_scale), np.int32),
    }
    first, *rest = graph.node
    body = onnx.helper.make_node(first.op_type, ["x", "w", "b"], list(first.output), name=first.name)
    body.attribute.extend(first.attribute)
    last_output = graph.output[0].name
    nodes = [
        onnx.helper.make_node("DequantizeLinear", [INPUT_NAME, "x_scale", "x_zero"], ["x"]),
        onnx.helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=0),
        onnx.helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zero"], ["b"], axis=0),
        body, *rest,
        onnx.helper.make_node("QuantizeLinear", ["float_output", "y_scale", "y_zero"], [OUTPUT_NAME]),
    ]
    for node in nodes[3:-1]:  # the block's last node now writes the float output the Q reads
        node.output[:] = ["float_output" if name == last_output else name for name in node.output]
    rank = len(graph.input[0].type.tensor_type.shape.dim)
    u8 = onnx.TensorProto.UINT8
    quantized = onnx.helper.make_graph(
        nodes, "block_int8",
        [onnx.helper.make_tensor_value_info(INPUT_NAME, u8, [None] * rank)],
        [onnx.helper.make_tensor_value_info(OUTPUT_NAME, u8, [None] * rank)],
        initializer=[numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    return onnx.helper.make_model(quantized, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)


RUNTIMES: Mapping[str, Runtime] = MappingProxyType(
    {r.name: r for r in (EagerRuntime(), OrtRuntime(), OrtInt8Runtime(), OpenVinoRuntime(), OpenVinoBf16Runtime(),
                         OpenVinoInt8Runtime())})
"""The runtimes by name (read-only), listed even when not installed: a new one is a `Runtime` class and a line here."""


def get_runtime(name: str) -> Runtime:
    """The runtime called ``name``, installed.

    Raises:
        LatencyError: No runtime has that name (the message lists the known ones), or its
            package is not installed (the message says how to install it).
    """
    found = RUNTIMES.get(name)
    if found is None:
        raise LatencyError(f"unknown runtime {name!r} (key 'runtime'); known runtimes: {', '.join(RUNTIMES)}")
    if (why := found.missing) is not None:
        raise LatencyError(f"runtime {name!r} is {why}")
    return found


def runtime_status() -> dict[str, str]:
    """Every runtime of `RUNTIMES` → its package and version (``onnxruntime 1.31.1``), or why it cannot run here."""
    return {name: r.missing or f"{r.package} {r.version()}" for name, r in RUNTIMES.items()}


def latency_of(
    model: nn.Module, example: Tensor, *, runtime: str, threads: int = 1, warmup: int = 5, repeats: int = 20,
    clock: Clock = "wall",
) -> Latency:
    """Median latency of one forward pass of ``model(example)`` on ``runtime``.

    Args:
        model: The model (timed in eval mode; its modes are restored).
        example: The input batch.
        runtime: A name in `RUNTIMES`.
        threads: Intra-op threads.
        warmup: Untimed calls first.
        repeats: Timed calls (the median is reported).
        clock: ``wall`` or ``cpu`` time (see `spiralkit.measure.measure_call`).

    Raises:
        LatencyError: ``runtime`` is unknown or not installed.
    """
    chosen = get_runtime(runtime)
    with tempfile.TemporaryDirectory(prefix="spiralkit-latency-") as scratch, eval_mode(model), torch.no_grad():
        call = chosen.prepare(model, example, threads=threads, scratch=Path(scratch))
        return measure_call(call, batch_size=int(example.shape[0]), threads=threads, warmup=warmup, repeats=repeats,
                            clock=clock)


def interleaved_ms(
    runs: Sequence[tuple[nn.Module, Tensor]],
    *,
    runtime: str,
    threads: int = 1,
    warmup: int = 2,
    repeats: int = 5,
    passes: int = 3,
    clock: Clock = "wall",
) -> list[float]:
    """Milliseconds of each ``model(example)`` of ``runs``, timed in turn, robust to a busy machine.

    Every run is prepared first; then ``passes`` passes each take the median of ``repeats``
    calls of every run in turn, and a run keeps its lowest median. Noise on a shared
    machine only adds time, and a burst of load lasts longer than one run's calls:
    spreading each run's timings over the whole measurement keeps a burst from sticking
    to one of them, and the runs compared see the same machine.

    Raises:
        LatencyError: ``runtime`` is unknown or not installed.
    """
    chosen = get_runtime(runtime)
    with tempfile.TemporaryDirectory(prefix="spiralkit-latency-") as scratch, torch.no_grad():
        calls = []
        for index, (model, example) in enumerate(runs):
            directory = Path(scratch) / str(index)
            directory.mkdir()
            with eval_mode(model):
                calls.append(chosen.prepare(model, example, threads=threads, scratch=directory))
        best = [math.inf] * len(calls)
        for _ in range(passes):
            for index, ((model, example), call) in enumerate(zip(runs, calls)):
                with eval_mode(model):
                    timed = measure_call(call, batch_size=int(example.shape[0]), threads=threads, warmup=warmup,
                                         repeats=repeats, clock=clock)
                best[index] = min(best[index], timed.median_ms)
    return best
