"""Plots of results, drawn with matplotlib's Agg canvas (no display, no pyplot state).

The report layer draws what the spiral layer measured: it takes plain typed points and
never imports `spiralkit.spiral`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from spiralkit.export import atomic_write_bytes

__all__ = ["PLOT_FORMATS", "Point", "plot_points"]

PLOT_FORMATS = ("png", "svg")
"""The files `plot_points` writes: ``STEM.png`` and ``STEM.svg``."""


@dataclass(frozen=True)
class Point:
    """One labelled point with error bars (mean ± standard deviation on each axis).

    Attributes:
        label: the legend entry, e.g. the method's name.
        x: mean on the x axis.
        y: mean on the y axis.
        x_err: standard deviation on the x axis.
        y_err: standard deviation on the y axis.
    """

    label: str
    x: float
    y: float
    x_err: float = 0.0
    y_err: float = 0.0


def plot_points(
    points: Sequence[Point],
    stem: Path,
    *,
    x_label: str,
    y_label: str,
    title: str,
    reference: float | None = None,
    reference_label: str = "baseline",
) -> list[Path]:
    """Draw ``points`` with their error bars and write ``stem.png`` and ``stem.svg`` atomically.

    Args:
        points: one marker with error bars each, in legend order.
        stem: the output path without its suffix; its directory must exist.
        x_label: the x axis's label.
        y_label: the y axis's label.
        title: the figure's title.
        reference: a value drawn as a dashed horizontal line (e.g. the baseline's metric).
        reference_label: the legend entry of ``reference``.

    Returns:
        The files written, PNG first.
    """
    figure = Figure(figsize=(6.0, 4.0), layout="constrained")
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if reference is not None:
        axes.axhline(reference, color="grey", linestyle="--", linewidth=1, label=reference_label)
    for point in points:
        axes.errorbar(point.x, point.y, xerr=point.x_err, yerr=point.y_err, fmt="o", capsize=4, label=point.label)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    written = []
    for fmt in PLOT_FORMATS:
        buffer = io.BytesIO()
        # No date in the metadata: the same results give the same files.
        canvas.print_figure(buffer, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
        path = stem.with_name(f"{stem.name}.{fmt}")
        atomic_write_bytes(path, buffer.getvalue())
        written.append(path)
    return written
