"""``spiral bench``: time models on chosen runtimes, batches and threads, interleaved."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.markup import escape
from rich.table import Table

from spiralkit.bench.runtimes import BenchError, runtime
from spiralkit.bench.targets import Candidate
from spiralkit.bench.timing import Timing, time_interleaved
from spiralkit.cpu import cpu_flags
from spiralkit.latency.runtimes import Compiled, runtime_status
from spiralkit.measure import count_macs
from spiralkit.modules import torch_threads

__all__ = ["BENCH_SCHEMA", "BenchConfig", "BenchResult", "BenchRow", "bench", "bench_table", "machine", "runtimes_caption"]

BENCH_SCHEMA = "spiralkit.bench/1"


@dataclass(frozen=True)
class BenchConfig:
    """What to time and how often.

    Attributes:
        runtimes: `spiralkit.latency.runtimes.RUNTIMES` names.
        batches: Batch sizes.
        threads: Intra-op thread counts.
        warmup: Untimed rounds.
        repeats: Timed rounds (each times every candidate once).
        seed: Seed of the random input.
    """

    runtimes: tuple[str, ...] = ("eager", "ort")
    batches: tuple[int, ...] = (1,)
    threads: tuple[int, ...] = (1,)
    warmup: int = 5
    repeats: int = 30
    seed: int = 0

    def __post_init__(self) -> None:
        for name in self.runtimes:
            runtime(name)  # unknown or not installed: fail before any work
        if not self.runtimes or not self.batches or not self.threads:
            raise BenchError("give at least one runtime, batch size and thread count")
        if min(self.batches) < 1 or min(self.threads) < 1 or self.repeats < 1 or self.warmup < 0:
            raise BenchError(f"batches, threads and repeats must be >= 1 and warmup >= 0; got {self}")


@dataclass(frozen=True)
class BenchRow:
    """One model on one runtime at one batch size and thread count.

    Attributes:
        model: The candidate's name.
        runtime: The runtime's name.
        batch: Batch size.
        threads: Intra-op threads.
        median_ms: Median latency of one batch.
        p10_ms: 10th percentile.
        p90_ms: 90th percentile.
        repeats: Timed calls.
        macs: MACs of one batch (an int8 ONNX model: its float model's; None when that is unknown).
        speedup: The first candidate's median on the same runtime, batch and threads over this one's.
    """

    model: str
    runtime: str
    batch: int
    threads: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    macs: int | None
    speedup: float | None = None


def machine() -> dict[str, object]:
    """The machine a benchmark ran on: CPU, cores, load, instruction sets, runtime versions."""
    flags = cpu_flags()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "isa": [flag for flag in wanted if flag in flags],
        "runtimes": runtime_status(),
    }


def runtimes_caption() -> str:
    """One line naming every runtime's version, or that it is not installed."""
    text = "runtimes: " + "; ".join(f"{name}: {status}" for name, status in runtime_status().items())
    return escape(text)  # "spiralkit[openvino]" is not rich markup


def bench(candidates: Sequence[Candidate], input_shape: Sequence[int], config: BenchConfig, workdir: Path) -> list[BenchRow]:
    """Time every candidate on every runtime, per thread count and batch size, interleaved.

    For each (threads, batch) all (candidate, runtime) pairs are compiled, then timed
    round-robin (`spiralkit.bench.timing.time_interleaved`). A candidate that exists only
    as ONNX is skipped on runtimes that cannot run ONNX (eager).

    Args:
        candidates: The models; the first is the reference of ``speedup``.
        input_shape: One input's shape, without the batch.
        config: Runtimes, batches, threads, repeats.
        workdir: Where exported files go.

    Returns:
        One row per timed (threads, batch, runtime, candidate).
    """
    rows: list[BenchRow] = []
    generator = torch.Generator().manual_seed(config.seed)
    for threads in config.threads:
        for batch in config.batches:
            x = torch.randn(batch, *input_shape, generator=generator)
            compiled = _compile_all(candidates, x, config.runtimes, threads, workdir / f"t{threads}-b{batch}")
            with torch_threads(threads):
                timings = time_interleaved({key: _call(run, x) for key, run in compiled.items()},
                                           warmup=config.warmup, repeats=config.repeats)
            rows.extend(_rows(candidates, timings, x, batch=batch, threads=threads))
    return rows


def _compile_all(candidates: Sequence[Candidate], x: torch.Tensor, runtimes: Sequence[str], threads: int,
                 workdir: Path) -> dict[tuple[str, str], Compiled]:
    compiled: dict[tuple[str, str], Compiled] = {}
    for index, candidate in enumerate(candidates):
        for name in runtimes:
            target = runtime(name)
            where = workdir / f"{index}-{name}"
            where.mkdir(parents=True, exist_ok=True)
            if candidate.onnx is not None:
                if target.reads_onnx:
                    compiled[(candidate.name, name)] = target.from_onnx(candidate.onnx, x, threads=threads)
            elif candidate.module is not None:
                compiled[(candidate.name, name)] = target.from_module(candidate.module, x, threads=threads,
                                                                      scratch=where)
    return compiled


def _call(run: Compiled, x: torch.Tensor) -> Callable[[], object]:
    return lambda: run(x)


def _rows(candidates: Sequence[Candidate], timings: dict[tuple[str, str], Timing], x: torch.Tensor, *,
          batch: int, threads: int) -> list[BenchRow]:
    counted = {c.name: c.module if c.module is not None else c.float_model for c in candidates}
    macs = {name: None if model is None else count_macs(model, x) for name, model in counted.items()}
    first: dict[str, float] = {}
    rows = []
    for (model, name), timing in timings.items():
        reference = first.setdefault(name, timing.median_ms)
        rows.append(BenchRow(model=model, runtime=name, batch=batch, threads=threads, median_ms=timing.median_ms,
                             p10_ms=timing.p10_ms, p90_ms=timing.p90_ms, repeats=timing.repeats, macs=macs[model],
                             speedup=reference / timing.median_ms))
    return rows


def bench_table(rows: Sequence[BenchRow], *, title: str) -> Table:
    """The rows as a rich table: median with its p10–p90 spread, and the speed-up; the runtimes below it."""
    table = Table(title=title, caption=runtimes_caption())
    for column in ("model", "runtime", "batch", "threads", "median ms", "p10–p90 ms", "MMACs", "speed-up"):
        table.add_column(column, justify="left" if column in ("model", "runtime") else "right",
                         no_wrap=column in ("model", "runtime"))
    for row in rows:
        table.add_row(row.model, row.runtime, str(row.batch), str(row.threads), f"{row.median_ms:.3f}",
                      f"{row.p10_ms:.3f}–{row.p90_ms:.3f}", "" if row.macs is None else f"{row.macs / 1e6:,.2f}",
                      "" if row.speedup is None else f"{row.speedup:.2f}x")
    return table


@dataclass(frozen=True)
class BenchResult:
    """What ``spiral bench`` writes as JSON."""

    target: str
    input_shape: tuple[int, ...]
    config: BenchConfig
    rows: list[BenchRow]
    machine: dict[str, object] = field(default_factory=machine)

    def to_dict(self) -> dict[str, object]:
        """The result as JSON-ready data, ``schema`` first."""
        return {"schema": BENCH_SCHEMA, **asdict(self)}
