"""Measured latency as a pruning target: runtimes, latency tables and the latency-constrained planner.

* `spiralkit.latency.runtimes` — the one runtime table (``eager``, ``ort``, ``ort_int8``, optional
  ``openvino`` and ``openvino_bf16``), shared with ``spiral bench``, and `latency_of` to time a model on one.
* `spiralkit.latency.table` — per-block latency tables over a grid of widths, cached on disk.
* `spiralkit.latency.planner` — per-group widths that keep the most importance within a
  predicted latency (`plan_for_latency`, `choose_widths`).
"""

from spiralkit.latency.planner import (
    GroupWeight,
    LatencyPlan,
    calibration_ms,
    choose_widths,
    group_weights,
    narrowest_counts,
    narrowest_model,
    plan_for_latency,
    table_for,
)
from spiralkit.latency.runtimes import (
    RUNTIMES,
    Compiled,
    LatencyError,
    Runtime,
    get_runtime,
    interleaved_ms,
    latency_of,
    runtime_status,
)
from spiralkit.latency.table import Block, BlockShape, LatencyTable, TableEnv, build_table, table_blocks, width_grid

__all__ = [
    "RUNTIMES",
    "Block",
    "BlockShape",
    "Compiled",
    "GroupWeight",
    "LatencyError",
    "LatencyPlan",
    "LatencyTable",
    "Runtime",
    "TableEnv",
    "build_table",
    "calibration_ms",
    "choose_widths",
    "get_runtime",
    "group_weights",
    "interleaved_ms",
    "latency_of",
    "narrowest_counts",
    "narrowest_model",
    "plan_for_latency",
    "runtime_status",
    "table_blocks",
    "table_for",
    "width_grid",
]
