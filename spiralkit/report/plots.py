"""Plots of results, drawn with matplotlib's Agg canvas (no display, no pyplot state).

The report layer draws what the spiral layer measured: it takes plain typed points and
never imports `spiralkit.spiral`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from spiralkit.export import atomic_write_bytes

__all__ = ["PLOT_FORMATS", "Point", "heatmap_svg", "plot_points"]

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
        path = stem.with_name(f"{stem.name}.{fmt}")
        atomic_write_bytes(path, _render(canvas, fmt))
        written.append(path)
    return written


def _render(canvas: FigureCanvasAgg, fmt: str) -> bytes:
    """The figure as a ``png`` or ``svg`` file's bytes."""
    buffer = io.BytesIO()
    # No date in the metadata: the same results give the same files.
    canvas.print_figure(buffer, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
    return buffer.getvalue()


def heatmap_svg(
    values: Sequence[Sequence[float]],
    *,
    rows: Sequence[str],
    columns: Sequence[str],
    title: str,
    colorbar: str,
) -> str:
    """A heatmap of ``values[row][column]`` as an ``<svg>`` element to inline in HTML.

    Each cell is annotated with its value; ``NaN`` cells are left blank. Text is drawn as
    paths (matplotlib's default), so names need no escaping in the SVG.

    Args:
        values: one row per entry of ``rows``, one value per entry of ``columns``.
        rows: the y axis's labels, top to bottom.
        columns: the x axis's labels, left to right.
        title: the figure's title.
        colorbar: the colour bar's label.

    Returns:
        The SVG markup from its ``<svg`` tag on (no XML declaration or doctype).
    """
    grid = np.asarray(values, dtype=float).reshape(len(rows), len(columns))
    figure = Figure(figsize=(1.2 + 0.75 * len(columns), 1.2 + 0.35 * len(rows)), layout="constrained")
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="Reds")
    axes.set_xticks(range(len(columns)), labels=list(columns), rotation=45, ha="right")
    axes.set_yticks(range(len(rows)), labels=list(rows))
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            axes.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize=7)
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label=colorbar)
    svg = _render(canvas, "svg").decode("utf-8")
    return svg[svg.index("<svg"):]
