"""``spiral bench``: time models on explicit runtimes, interleaved, and against the peers (``--peers``).

* `spiralkit.bench.runtimes` — the command's lookup in the one runtime table, `spiralkit.latency.RUNTIMES`
  (eager, ONNX Runtime, optional OpenVINO fp32/bf16);
* `spiralkit.bench.timing` — round-robin timing with medians and spreads;
* `spiralkit.bench.targets` — a run directory's models, or a model named as recipes name them;
* `spiralkit.bench.core` — the timing grid (runtimes x batches x threads) and its table;
* `spiralkit.bench.peers` — spiralkit against ONNX Runtime, Torch-Pruning, torch.nn.utils.prune
  and OpenVINO + NNCF at the same MACs budget.

This package sits at the top with the command: it composes the spiral layer (run
directories) with the algorithms.
"""

from spiralkit.bench.core import BENCH_SCHEMA, BenchConfig, BenchResult, BenchRow, bench, bench_table, machine
from spiralkit.bench.runtimes import BenchError, runtime
from spiralkit.bench.targets import Candidate, input_shape_of, model_candidates, run_candidates
from spiralkit.bench.timing import Timing, time_interleaved
from spiralkit.latency.runtimes import RUNTIMES, Runtime

__all__ = [
    "BENCH_SCHEMA",
    "RUNTIMES",
    "BenchConfig",
    "BenchError",
    "BenchResult",
    "BenchRow",
    "Candidate",
    "Runtime",
    "Timing",
    "bench",
    "bench_table",
    "input_shape_of",
    "machine",
    "model_candidates",
    "run_candidates",
    "runtime",
    "time_interleaved",
]
