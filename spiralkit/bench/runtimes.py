"""``spiral bench``'s way into the one runtime table, `spiralkit.latency.runtimes.RUNTIMES`.

The runtimes themselves (eager, ONNX Runtime, optional OpenVINO fp32/bf16), their versions
and what is missing live in the algorithm layer, shared with the latency tables; this module
adds only the command's error type and its wording of a bad ``--runtime``.
"""

from __future__ import annotations

from spiralkit.errors import SpiralError
from spiralkit.latency.runtimes import RUNTIMES, LatencyError, Runtime, get_runtime

__all__ = ["BenchError", "runtime"]


class BenchError(SpiralError):
    """A benchmark cannot run: an unknown or missing runtime, model or run directory."""


def runtime(name: str) -> Runtime:
    """The runtime called ``name``, installed.

    Raises:
        BenchError: ``name`` is not in `RUNTIMES`, or its package is not installed.
    """
    if name not in RUNTIMES:
        raise BenchError(f"unknown runtime {name!r}; runtimes: {', '.join(RUNTIMES)}")
    try:
        return get_runtime(name)
    except LatencyError as exc:  # not installed: the message says how to install it
        raise BenchError(str(exc)) from None
