"""What a model costs: parameters and non-zeros, MACs, latency, and size on disk."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from spiralkit.export.weights import save_sparse, save_weights
from spiralkit.modules import eval_mode, torch_threads

__all__ = [
    "Clock",
    "Latency",
    "ParamCount",
    "SizeInfo",
    "count_macs",
    "count_macs_by_module",
    "count_params",
    "latency_by_module",
    "measure_call",
    "measure_latency",
    "size_on_disk",
]

Clock = Literal["wall", "cpu"]
"""How a call is timed: wall-clock time, or the CPU time of this process (see `measure_call`)."""

DENSE_FILENAME = "weights.safetensors"
SPARSE_FILENAME = "weights.sparse.safetensors"


@dataclass(frozen=True)
class ParamCount:
    """Number of parameters and how many of them are non-zero.

    Attributes:
        total: All parameter elements (weights and biases; shared parameters once).
        nonzero: Elements that are not zero (after any pruning mask is applied).
    """

    total: int
    nonzero: int

    @property
    def sparsity(self) -> float:
        """``1 - nonzero / total``; 0 for a model without parameters."""
        return 1.0 - self.nonzero / self.total if self.total else 0.0


@dataclass(frozen=True)
class Latency:
    """Wall-clock time of one forward pass.

    Attributes:
        median_ms: Median over the timed repeats, in milliseconds.
        p90_ms: 90th percentile (linear interpolation), in milliseconds.
        batch_size: First dimension of the example input.
        threads: Intra-op CPU threads used.
        repeats: Number of timed calls.
    """

    median_ms: float
    p90_ms: float
    batch_size: int
    threads: int
    repeats: int


@dataclass(frozen=True)
class SizeInfo:
    """Bytes on disk of a model's weights.

    Attributes:
        dense_bytes: Size of the dense safetensors file.
        sparse_bytes: Size of the sparse encoding (see `spiralkit.export.save_sparse`).
    """

    dense_bytes: int
    sparse_bytes: int

    @property
    def best_bytes(self) -> int:
        """The smaller of the two sizes."""
        return min(self.dense_bytes, self.sparse_bytes)


def count_params(model: nn.Module) -> ParamCount:
    """Count parameter elements and non-zeros; shared parameters are counted once.

    For parameters reparametrised by ``torch.nn.utils.prune`` (``weight_orig`` plus a
    ``weight_mask`` buffer), the non-zeros are counted in the masked weight the model uses.

    Args:
        model: Any module.

    Returns:
        Total and non-zero counts.
    """
    seen: set[int] = set()
    total = nonzero = 0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            total += param.numel()
            nonzero += int(torch.count_nonzero(_effective(module, name, param)))
    return ParamCount(total=total, nonzero=nonzero)


def _effective(module: nn.Module, name: str, param: Tensor) -> Tensor:
    """The tensor the forward pass sees: ``orig * mask`` for torch-pruned parameters."""
    base = name.removesuffix("_orig")
    if base != name and hasattr(module, f"{base}_mask"):
        return getattr(module, base).detach()
    return param.detach()


def _flop_counter(model: nn.Module, example: Tensor) -> FlopCounterMode:
    """A ``FlopCounterMode`` that has counted one forward pass of ``model(example)``."""
    counter = FlopCounterMode(display=False)
    # nn.MultiheadAttention's fused inference kernel is invisible to the counter: count
    # the same computation through the unfused path (a process-wide switch, restored).
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with eval_mode(model), torch.no_grad(), counter:
            model(example)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter


def count_macs(model: nn.Module, example: Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``example``.

    Counted with ``torch.utils.flop_counter.FlopCounterMode``, which counts matrix
    multiplications and convolutions (not biases, norms, activations or pooling, nor the
    score products inside CPU scaled-dot-product attention);
    ``MACs = FLOPs // 2``. E.g. ``Linear(10, 5)`` on a batch of 1 is 50 MACs. Zeros in
    the weights are counted like any other value.

    Args:
        model: The model; run in eval mode under ``no_grad``, its modes restored after.
        example: An input batch (the MACs scale with its batch size).

    Returns:
        MACs for the whole batch.
    """
    return _flop_counter(model, example).get_total_flops() // 2


def count_macs_by_module(model: nn.Module, example: Tensor) -> dict[str, int]:
    """Multiply-accumulates of one forward pass on ``example``, per submodule (as `count_macs`).

    A module's count includes its children's, so only leaves (e.g. Linear/Conv layers)
    add up to the total; a module called twice counts twice.

    Args:
        model: The model; run in eval mode under ``no_grad``, its modes restored after.
        example: An input batch.

    Returns:
        Module name (as in ``model.named_modules()``, the root excluded) → MACs, for every
        module that did any; the root's is `count_macs`.
    """
    counts = _flop_counter(model, example).get_flop_counts()
    # The counter names modules "<root class>.<path>"; the root itself by its class name.
    root = type(model).__name__
    return {key.partition(".")[2]: sum(ops.values()) // 2 for key, ops in counts.items()
            if key.startswith(f"{root}.")}


def measure_latency(
    model: nn.Module, example: Tensor, *, threads: int = 1, warmup: int = 10, repeats: int = 50,
    clock: Clock = "wall",
) -> Latency:
    """Time forward passes of ``model(example)`` in eval and inference mode.

    Each call is timed with ``time.perf_counter`` (CUDA is synchronised after each call).
    The global torch thread count and the model's train/eval modes are restored afterwards.

    Args:
        model: The model.
        example: An input batch.
        threads: Intra-op CPU threads (``torch.set_num_threads``) while timing.
        warmup: Untimed calls first (allocator, caches, lazy init).
        repeats: Timed calls.
        clock: ``wall`` or ``cpu`` time (see `measure_call`).

    Returns:
        Median and 90th percentile in milliseconds, with the settings used.

    Raises:
        ValueError: ``threads`` or ``repeats`` below 1, or ``warmup`` below 0.
    """
    call = _synchronised_call(model, example)
    with eval_mode(model):
        return measure_call(call, batch_size=int(example.shape[0]) if example.dim() else 1, threads=threads,
                            warmup=warmup, repeats=repeats, clock=clock)


def measure_call(
    call: Callable[[], object], *, batch_size: int, threads: int = 1, warmup: int = 10, repeats: int = 50,
    clock: Clock = "wall",
) -> Latency:
    """Time ``call()`` (e.g. one ONNX Runtime session run) under ``torch_threads(threads)`` and inference mode.

    The timing loop of `measure_latency`, for callables that are not modules; ``threads``
    only sets torch's thread count (a runtime with its own pool fixes its threads itself).

    Args:
        call: One forward pass.
        batch_size: The batch the call computes (recorded in the result).
        threads: Intra-op torch threads while timing.
        warmup: Untimed calls first.
        repeats: Timed calls.
        clock: ``wall``: ``time.perf_counter``. ``cpu``: ``time.process_time``, the CPU time of
            this process — the latency of a one-thread call on an idle core, but not slowed
            when other processes share the cores (a busy machine preempts a wall-clock timing
            by whole scheduler slices); with several threads it is their sum, not a latency.

    Returns:
        Median and 90th percentile in milliseconds, with the settings used.

    Raises:
        ValueError: ``threads`` or ``repeats`` below 1, or ``warmup`` below 0.
    """
    if threads < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need threads >= 1, repeats >= 1, warmup >= 0; got {threads=}, {repeats=}, {warmup=}")
    with torch_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            call()
        times_ms = [_time_ms(call, clock) for _ in range(repeats)]
    return Latency(
        median_ms=statistics.median(times_ms),
        p90_ms=float(np.percentile(times_ms, 90)),
        batch_size=batch_size,
        threads=threads,
        repeats=repeats,
    )


def latency_by_module(
    model: nn.Module, example: Tensor, *, threads: int = 1, warmup: int = 2, repeats: int = 10
) -> dict[str, float]:
    """Milliseconds each module takes in a forward pass of ``model(example)``, timed with forward hooks.

    Every module gets a pre-hook and a hook that read ``time.perf_counter``; a module's time
    per pass is the sum over its calls and includes its children's, so only leaves (and
    what runs outside any leaf: functional ops in a parent's ``forward``, e.g. the attention
    product of a Hugging Face self-attention) add up to the whole pass. The hooks cost a few
    microseconds per call, which matters only for tiny layers. Each module's value is its
    median over ``repeats`` passes (no CUDA synchronisation: time a CPU model).

    Args:
        model: The model; run in eval and inference mode, its modes restored after.
        example: An input batch.
        threads: Intra-op CPU threads while timing (restored after).
        warmup: Untimed passes first.
        repeats: Timed passes.

    Returns:
        Module name (as in ``model.named_modules()``; ``""`` is the whole pass) → median
        milliseconds, for every module that ran.

    Raises:
        ValueError: ``threads`` or ``repeats`` below 1, or ``warmup`` below 0.
    """
    if threads < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need threads >= 1, repeats >= 1, warmup >= 0; got {threads=}, {repeats=}, {warmup=}")
    starts: dict[str, list[float]] = {}
    spent: dict[str, float] = {}

    def before(name: str) -> Callable[..., None]:
        def hook(*_: object) -> None:
            starts.setdefault(name, []).append(time.perf_counter())
        return hook

    def after(name: str) -> Callable[..., None]:
        def hook(*_: object) -> None:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - starts[name].pop()
        return hook

    handles = [h for name, module in model.named_modules()
               for h in (module.register_forward_pre_hook(before(name)), module.register_forward_hook(after(name)))]
    passes: list[dict[str, float]] = []
    try:
        with torch_threads(threads), eval_mode(model), torch.inference_mode():
            for index in range(warmup + repeats):
                spent.clear()
                model(example)
                if index >= warmup:
                    passes.append(dict(spent))
    finally:
        for handle in handles:
            handle.remove()
    names = dict.fromkeys(name for one in passes for name in one)
    return {name: 1000.0 * statistics.median(one.get(name, 0.0) for one in passes) for name in names}


def size_on_disk(model: nn.Module | Mapping[str, Tensor], directory: Path) -> SizeInfo:
    """Write the dense and the sparse weights files and report their real sizes.

    Args:
        model: A module or a state dict.
        directory: Where ``weights.safetensors`` and ``weights.sparse.safetensors`` are
            written (created if missing; existing files are replaced).

    Returns:
        The two file sizes in bytes.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dense, sparse = directory / DENSE_FILENAME, directory / SPARSE_FILENAME
    save_weights(model, dense)
    save_sparse(model, sparse)
    return SizeInfo(dense_bytes=os.path.getsize(dense), sparse_bytes=os.path.getsize(sparse))


def _synchronised_call(model: nn.Module, example: Tensor) -> Callable[[], None]:
    """A call of ``model(example)`` that returns only when the device has finished."""

    def call() -> None:
        model(example)
        if example.is_cuda:
            torch.cuda.synchronize(example.device)

    return call


def _time_ms(call: Callable[[], object], clock: Clock = "wall") -> float:
    """Milliseconds of one call, on the wall clock or the process's CPU clock."""
    now = time.perf_counter if clock == "wall" else time.process_time
    start = now()
    call()
    return (now() - start) * 1000.0

