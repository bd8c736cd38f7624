"""ONNX export, verification against ONNX Runtime, and ONNX models that run like modules.

* `export_onnx` writes **one self-contained** ``.onnx`` file (weights inside, no
  ``.onnx.data`` beside it), atomically, with the input named ``"input"``, the output
  ``"output"`` and a dynamic batch dimension. It uses torch's own exporter
  (``torch.onnx.export(dynamo=True)``, built on ``torch.export``), whose graph optimiser
  already folds BatchNorm into the preceding convolution. Only the batch dimension is
  dynamic: other dimensions (e.g. a sequence length) are fixed to the example's. The
  deprecated TorchScript exporter would be 20-30x faster (0.1 s vs 1-4 s for a small CNN)
  but keeps neither parameter names through BatchNorm folding nor module scopes, which
  `spiralkit.quant.ptq` uses to map PyTorch module names to ONNX nodes.
* `verify_onnx` runs the file in ONNX Runtime and compares it with the PyTorch model.
* `OrtModel` wraps an ``onnxruntime.InferenceSession`` in an ``nn.Module`` (with no
  parameters), so `spiralkit.tasks.evaluate` and `spiralkit.measure.measure_latency` treat
  an ONNX file — float or int8 — exactly like a PyTorch model.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from spiralkit.errors import SpiralError
from spiralkit.export.weights import atomic_write_bytes
from spiralkit.modules import eval_mode

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "SCOPES_KEY",
    "ExportError",
    "OrtModel",
    "VerifyResult",
    "compare_outputs",
    "export_onnx",
    "ort_session",
    "verify_onnx",
]

INPUT_NAME = "input"
OUTPUT_NAME = "output"
BATCH_DIM = "batch"
# Node metadata in which the exporter records the PyTorch module scopes a node came from.
SCOPES_KEY = "pkg.torch.onnx.name_scopes"
# Protobuf cannot serialise a message of 2 GiB or more, so no single .onnx file can be larger.
_PROTOBUF_LIMIT = 2**31 - 1
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# ONNX Runtime input types → numpy dtypes (what `OrtModel` converts tensors to).
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


class ExportError(SpiralError):
    """A model cannot be exported, or an exported file disagrees with its model."""


@dataclass(frozen=True)
class VerifyResult:
    """How closely two models' outputs agree on the same inputs.

    Attributes:
        max_abs_diff: ``max |candidate - reference|`` over every output element.
        cosine: Mean over the examples (rows of the batch dimension) of the cosine
            similarity ``<a, b> / (|a| |b|)`` of the flattened outputs; 1 is identical
            up to scale.
    """

    max_abs_diff: float
    cosine: float


# --------------------------------------------------------------------------- export


def export_onnx(
    model: nn.Module,
    example: Tensor,
    path: Path,
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
    translations: Mapping[Any, Callable[..., Any]] | None = None,
) -> Path:
    """Export ``model`` to a single self-contained ONNX file.

    The model is exported in eval mode (BatchNorm uses its running statistics and is folded
    into the convolution before it); each submodule's train/eval mode is restored afterwards.
    The file is written to a temporary name in the same directory and moved over ``path``,
    so a reader never sees half a file.

    Args:
        model: A model with one tensor input and one tensor output.
        example: An example input batch; only its shape and dtype matter.
        path: Destination ``.onnx`` file; its directory is created if missing.
        dynamic_batch: Make dimension 0 of the input and output symbolic (``"batch"``);
            otherwise the file only accepts ``example``'s batch size.
        opset: ONNX opset version; None takes the exporter's default.
        translations: Custom ops of the model (``torch.ops.ns.op.default``) → the onnxscript
            function that writes each as ONNX (the exporter's ``custom_translation_table``);
            how `spiralkit.quant.ort.export_weight_only_onnx` emits ONNX Runtime's
            ``MatMulNBits``.

    Returns:
        ``path``.

    Raises:
        ExportError: The exporter fails (the message names the model class and quotes the
            exporter), or the model is too large for a single file (2 GiB).
    """
    path = Path(path)
    program = _export_program(model, _export_example(example, dynamic_batch=dynamic_batch),
                              dynamic_batch=dynamic_batch, opset=opset, translations=translations)
    proto = program.model_proto
    _strip_debug_metadata(proto)
    if proto.ByteSize() > _PROTOBUF_LIMIT:
        raise ExportError(
            f"{type(model).__name__} is {proto.ByteSize() / 2**30:.1f} GiB as ONNX; a single .onnx "
            f"file (no external data) is limited to 2 GiB: cannot write {path}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, proto.SerializeToString())
    return path


def _strip_debug_metadata(proto: Any) -> None:
    """Drop the exporter's per-node debug records except the module scopes, in place.

    The exporter stores for every node its Python stack trace and FX node, which name local
    source files and make a ResNet-20 file 6% larger; only the module scopes
    (``pkg.torch.onnx.name_scopes``) are kept, because they map nodes back to PyTorch module
    names (see `spiralkit.quant.ort.nodes_of_modules`).
    """
    for node in proto.graph.node:
        kept = [prop for prop in node.metadata_props if prop.key == SCOPES_KEY]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)


def _export_example(example: Tensor, *, dynamic_batch: bool) -> Tensor:
    """The input to trace with: ``example`` on the CPU, doubled when its batch is 1.

    ``torch.export`` specialises a dimension whose example size is 1 (it cannot tell 1 from
    a broadcast), so a dynamic batch needs an example batch of at least 2.
    """
    if not isinstance(example, Tensor) or example.dim() == 0:
        raise ExportError(f"export needs an example input batch (a tensor with a batch dimension), got {example!r}")
    example = example.detach()
    if dynamic_batch and example.shape[0] == 1:
        example = torch.cat([example, example])
    return example


def _export_program(
    model: nn.Module,
    example: Tensor,
    *,
    dynamic_batch: bool,
    opset: int | None,
    translations: Mapping[Any, Callable[..., Any]] | None = None,
) -> Any:
    """Run torch's ONNX exporter in memory; wrap its failures in an `ExportError`.

    When the export fails and ``model`` holds Hugging Face models whose attention is not
    the plain ``eager`` implementation (e.g. ``sdpa``, which T5's position bias cannot
    export through), the export is tried once more with eager attention — the same
    weights and function — and each model's implementation is restored afterwards.
    """
    try:
        return _export_once(model, example, dynamic_batch=dynamic_batch, opset=opset, translations=translations)
    except ExportError as first:
        switched = _hf_attention_implementations(model)
        if not switched:
            raise
        try:
            for module in switched:
                module.set_attn_implementation("eager")
            return _export_once(model, example, dynamic_batch=dynamic_batch, opset=opset, translations=translations)
        except ExportError as second:
            raise ExportError(f"{first}\n(retried with eager attention: {second})") from second
        finally:
            for module, implementation in switched.items():
                module.set_attn_implementation(implementation)


def _hf_attention_implementations(model: nn.Module) -> dict[nn.Module, str]:
    """The Hugging Face models inside ``model`` whose attention is not ``eager``, with their implementation."""
    found: dict[nn.Module, str] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        implementation = getattr(config, "_attn_implementation", None)
        if callable(getattr(module, "set_attn_implementation", None)) and isinstance(implementation, str) and (
                implementation != "eager"):
            found[module] = implementation
    return found


def _export_once(
    model: nn.Module,
    example: Tensor,
    *,
    dynamic_batch: bool,
    opset: int | None,
    translations: Mapping[Any, Callable[..., Any]] | None,
) -> Any:
    """One run of torch's ONNX exporter."""
    dynamic_shapes = ({0: torch.export.Dim(BATCH_DIM)},) if dynamic_batch else None
    try:
        with eval_mode(model), warnings.catch_warnings():
            # Warnings about torch internals users cannot act on: deprecations inside the
            # exporter, and nn.LSTM/GRU re-assigning their flat weights while traced.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights", category=UserWarning)
            # ONNX's constant folding evaluates log(0) in masked-out branches (T5's position buckets).
            warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"onnx\.reference")
            program = torch.onnx.export(
                model,
                (example,),
                None,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamo=True,
                external_data=False,
                dynamic_shapes=dynamic_shapes,
                custom_translation_table=dict(translations) if translations else None,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many unrelated types; all mean "cannot export"
        raise ExportError(f"cannot export {type(model).__name__} to ONNX: {_exporter_message(exc)}") from exc
    if program is None:
        raise ExportError(f"cannot export {type(model).__name__} to ONNX: the exporter returned nothing")
    return program


def _exporter_message(exc: BaseException, *, max_lines: int = 6) -> str:
    """The useful part of an exporter failure: the root cause's type and first lines.

    The exporter wraps the real error (e.g. ``GuardOnDataDependentSymNode`` for Python
    control flow on tensor values) in a generic, colourised "step 1/3" message.
    """
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    lines = [line for line in _ANSI.sub("", str(root)).strip().splitlines() if line.strip()]
    text = "\n".join(lines[:max_lines] + (["..."] if len(lines) > max_lines else []))
    return f"{type(root).__name__}: {text}"


# --------------------------------------------------------------------------- running


def ort_session(path: Path, *, threads: int = 1, optimized_path: Path | None = None) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with a fixed number of threads.

    Args:
        path: The ``.onnx`` file.
        threads: Intra-op threads (``>= 1``); inter-op execution is sequential.
        optimized_path: When given, ONNX Runtime also writes the graph it actually runs
            (after its optimisations, e.g. Q/DQ pairs fused into integer kernels) there.

    Returns:
        The session, with all graph optimisations enabled.

    Raises:
        ValueError: ``threads`` below 1.
        ExportError: The file is missing or ONNX Runtime cannot load it.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX file not found: {path}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Errors only: saving an optimised graph warns that it is hardware specific, which is the point.
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped exceptions
        raise ExportError(f"ONNX Runtime cannot load {path}: {exc}") from exc


class OrtModel(nn.Module):
    """An ONNX file run by ONNX Runtime on the CPU, behaving like an ``nn.Module``.

    ``forward`` converts the input tensor to numpy, runs the session and returns the first
    output as a tensor, so `spiralkit.tasks.evaluate` and `spiralkit.measure.measure_latency`
    work unchanged. The module has no parameters (`count_params` is 0; the weights live in
    the file) and ``train()``/``eval()`` change nothing about the computation. The thread
    count is fixed when the session is created; ``torch.set_num_threads`` does not affect it.
    Copying or pickling a model reopens the file.

    Args:
        path: The ``.onnx`` file, with one input.
        threads: ONNX Runtime intra-op threads.

    Raises:
        ExportError: The file is missing, unloadable, or does not have exactly one input.
    """

    def __init__(self, path: Path, *, threads: int = 1) -> None:
        super().__init__()
        self.path = Path(path)
        self.threads = threads
        self._open()

    def _open(self) -> None:
        self._session = ort_session(self.path, threads=self.threads)
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ExportError(f"{self.path} has {len(inputs)} inputs; OrtModel runs models with exactly one")
        self._input_name = inputs[0].name
        self._input_dtype = _ORT_DTYPES.get(inputs[0].type, np.float32)

    def forward(self, x: Tensor) -> Tensor:
        """Run the ONNX model on ``x`` (moved to the CPU); return its first output."""
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=self._input_dtype)
        try:
            output = self._session.run(None, {self._input_name: array})[0]
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise ExportError(f"ONNX Runtime failed running {self.path} on input {tuple(x.shape)}: {exc}") from exc
        return torch.from_numpy(np.asarray(output))

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, threads={self.threads}"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_session", "_input_name", "_input_dtype"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()


# --------------------------------------------------------------------------- verification


def compare_outputs(reference: Tensor, candidate: Tensor) -> VerifyResult:
    """Largest absolute difference and mean per-example cosine similarity of two outputs.

    Args:
        reference: The trusted output, shape ``(batch, ...)``.
        candidate: The output to judge, same shape.

    Returns:
        The agreement (see `VerifyResult`). Two all-zero rows count as cosine 1.

    Raises:
        ValueError: The shapes differ.
    """
    if reference.shape != candidate.shape:
        raise ValueError(f"outputs differ in shape: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    a = reference.detach().double().reshape(reference.shape[0] if reference.dim() else 1, -1)
    b = candidate.detach().double().reshape(a.shape)
    max_abs = float((a - b).abs().max()) if a.numel() else 0.0
    dot = (a * b).sum(dim=1)
    norms = a.norm(dim=1) * b.norm(dim=1)
    both_zero = (a.norm(dim=1) == 0) & (b.norm(dim=1) == 0)
    cosine = torch.where(both_zero, torch.ones_like(dot), dot / norms.clamp_min(1e-300))
    return VerifyResult(max_abs_diff=max_abs, cosine=float(cosine.mean()) if cosine.numel() else 1.0)


def verify_onnx(
    model: nn.Module,
    path: Path,
    inputs: Tensor,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    threads: int = 1,
) -> VerifyResult:
    """Check that an ONNX file computes what ``model`` computes.

    Both run on ``inputs``: ``model`` in eval mode without gradients (its modes restored
    afterwards), the file in ONNX Runtime on the CPU. They agree when every element
    satisfies ``|onnx - torch| <= atol + rtol * |torch|`` (as ``numpy.allclose``).

    Args:
        model: The PyTorch model the file came from.
        path: The ``.onnx`` file.
        inputs: A batch to run both on.
        atol: Absolute tolerance.
        rtol: Relative tolerance.
        threads: ONNX Runtime intra-op threads.

    Returns:
        The agreement measured.

    Raises:
        ExportError: The outputs differ beyond tolerance, differ in shape, or are not
            finite; the message names the file and the largest difference.
    """
    path = Path(path)
    with eval_mode(model), torch.inference_mode():
        expected = model(inputs).detach().cpu().float()
    actual = OrtModel(path, threads=threads)(inputs).float()
    if actual.shape != expected.shape:
        raise ExportError(
            f"{path} gives output shape {tuple(actual.shape)}, {type(model).__name__} gives {tuple(expected.shape)}"
        )
    result = compare_outputs(expected, actual)
    if not torch.isfinite(actual).all() or not torch.isfinite(expected).all():
        raise ExportError(f"{path}: outputs are not finite (ONNX or {type(model).__name__}); cannot verify")
    if not torch.allclose(actual, expected, atol=atol, rtol=rtol):
        raise ExportError(
            f"{path} disagrees with {type(model).__name__}: max |diff| = {result.max_abs_diff:.3g} "
            f"(atol={atol:g}, rtol={rtol:g}), cosine = {result.cosine:.6f}"
        )
    return result
