"""The runtimes a latency is measured on, as an explicit table: a new one is one class and one line.

A `Runtime` turns a model and an input batch into a call that runs one forward pass the way
that runtime would in deployment (``eager``: the PyTorch module; ``ort``: the model exported
by `spiralkit.export.onnx.export_onnx` and run by ONNX Runtime on pre-converted numpy input,
so that no tensor conversion is timed). `latency_of` times such a call with
`spiralkit.measure.measure_call`.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import onnx
import onnxruntime
from onnx import numpy_helper
import torch
from torch import Tensor, nn

from spiralkit.errors import PruneError
from spiralkit.export.onnx import INPUT_NAME, OUTPUT_NAME, export_onnx, ort_session
from spiralkit.measure import Clock, Latency, measure_call
from spiralkit.modules import eval_mode

__all__ = ["RUNTIMES", "EagerRuntime", "block_onnx", "interleaved_ms", "LatencyError", "OrtRuntime", "Runtime", "get_runtime", "latency_of"]


class LatencyError(PruneError):
    """A latency table or a latency-constrained plan cannot be made (unknown runtime, unreachable target)."""


class Runtime(Protocol):
    """What the latency tables ask of a runtime.

    Attributes:
        name: the recipe's name of the runtime (``runtime: ort``).
    """

    name: ClassVar[str]

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


class EagerRuntime:
    """PyTorch eager mode on the CPU (threads are set by `latency_of` around the timing)."""

    name: ClassVar[str] = "eager"

    def version(self) -> str:
        """``torch.__version__``."""
        return str(torch.__version__)

    def prepare(self, model: nn.Module, example: Tensor, *, threads: int, scratch: Path) -> Callable[[], object]:
        """``model(example)``."""
        return lambda: model(example)


class OrtRuntime:
    """ONNX Runtime fp32 on the CPU, with all graph optimisations (BatchNorm folded, Conv+ReLU fused).

    A lone block — ``nn.Linear``, or ``nn.Sequential(conv, batch norm, ReLU)`` as latency tables
    time them — is written as ONNX directly (`block_onnx`): the graph `export_onnx` gives it,
    without the exporter's 1-3 s per call, which would make a table of a hundred entries slow.
    """

    name: ClassVar[str] = "ort"

    def version(self) -> str:
        """``onnxruntime.__version__``."""
        return str(onnxruntime.__version__)

    def prepare(self, model: nn.Module, example: Tensor, *, threads: int, scratch: Path) -> Callable[[], object]:
        """Export ``model`` at ``example``'s fixed shape, open a session, convert the input once."""
        path = scratch / "model.onnx"
        if (proto := block_onnx(model)) is not None:
            path.write_bytes(proto.SerializeToString())
        else:
            export_onnx(model, example, path, dynamic_batch=False)
        session = ort_session(path, threads=threads)
        feed = {INPUT_NAME: np.ascontiguousarray(example.detach().cpu().float().numpy())}
        return lambda: session.run(None, feed)


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


RUNTIMES: dict[str, type[Runtime]] = {r.name: r for r in (EagerRuntime, OrtRuntime)}
"""The runtimes latency can be measured and planned on: a new one is a `Runtime` class and a line here."""


def get_runtime(name: str) -> Runtime:
    """The runtime called ``name``.

    Raises:
        LatencyError: No runtime has that name; the message lists the known ones.
    """
    if name not in RUNTIMES:
        raise LatencyError(f"unknown runtime {name!r} (key 'runtime'); known runtimes: {', '.join(RUNTIMES)}")
    return RUNTIMES[name]()


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
        LatencyError: ``runtime`` is unknown.
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
        LatencyError: ``runtime`` is unknown.
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
