"""Plots of results, drawn with matplotlib's Agg canvas (no display, no pyplot state).

The report layer draws what the spiral layer measured: it takes plain typed points and
never imports `spiralkit.spiral`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from spiralkit.export import atomic_write_bytes

__all__ = [
    "PLOT_FORMATS", "Point", "Series", "bar_panels", "figure_svg", "heatmap_svg", "loss_plot", "path_panels", "plain",
    "plot_points", "rounds_plot",
]

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
        atomic_write_bytes(path, _figure_bytes(figure, fmt))
        written.append(path)
    return written


def _figure_bytes(figure: Figure, fmt: str) -> bytes:
    buffer = io.BytesIO()
    # No date in the metadata: the same results give the same files.
    FigureCanvasAgg(figure).print_figure(buffer, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
    return buffer.getvalue()


def figure_svg(figure: Figure) -> str:
    """``figure`` as an ``<svg>`` element to inline in HTML (no XML declaration, text kept as text)."""
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        text = _figure_bytes(figure, "svg").decode("utf-8")
    return text[text.index("<svg"):]


def plain(text: str) -> str:
    """``text`` as matplotlib shows it verbatim: ``$`` would start mathtext (and may not parse)."""
    return text.replace("$", r"\$")


@dataclass(frozen=True)
class Series:
    """Points drawn as one line (or markers only), e.g. a run's path or a Pareto front.

    Attributes:
        label: the legend entry.
        x: the x values.
        y: the y values, as many as ``x``.
        names: a text drawn next to each point (empty: none).
        line: join the points with a line.
        marker: the matplotlib marker.
        color: the matplotlib colour (empty: the next of the cycle).
    """

    label: str
    x: Sequence[float]
    y: Sequence[float]
    names: Sequence[str] = ()
    line: bool = True
    marker: str = "o"
    color: str = ""


def _panels(count: int, *, width: float = 3.6, height: float = 3.2) -> tuple[Figure, list[Axes]]:
    figure = Figure(figsize=(width * count, height), layout="constrained")
    return figure, [figure.add_subplot(1, count, i + 1) for i in range(count)]


def rounds_plot(
    kept: Series, rolled_back: Series, *, baseline: float, final: float | None, y_label: str
) -> Figure:
    """The metric of every round, kept and rolled-back rounds marked apart, the baseline as a line.

    Args:
        kept: the kept rounds (x: round number, y: metric).
        rolled_back: the rolled-back rounds.
        baseline: the dense model's metric, drawn as a dashed line.
        final: the final model's metric, drawn as a dotted line (None: not finished).
        y_label: the metric's name.
    """
    figure, (axes,) = _panels(1, width=6.4, height=3.4)
    axes.axhline(baseline, color="grey", linestyle="--", linewidth=1, label="baseline")
    if final is not None:
        axes.axhline(final, color="tab:blue", linestyle=":", linewidth=1, label="final")
    for series in (kept, rolled_back):
        if series.x:
            axes.plot(series.x, series.y, linestyle="none", marker=series.marker, color=series.color or None,
                      markersize=8, label=plain(series.label))
    axes.set_xlabel("round")
    axes.set_ylabel(plain(y_label))
    axes.xaxis.get_major_locator().set_params(integer=True)
    _finish(axes)
    return figure


def loss_plot(segments: Sequence[Series], *, boundaries: Sequence[tuple[float, str]], y_label: str) -> Figure:
    """Training loss per epoch along a run: one line per training call, round boundaries marked.

    The y axis is logarithmic when every loss is positive and they span more than a factor
    of ten (a baseline trained from scratch starts far above a recovery's losses).

    Args:
        segments: one series per training call (x: the epoch along the run, y: its mean loss);
            a series's label goes into the legend once.
        boundaries: ``(x, text)`` of each round's start, drawn as a dotted line with its text.
        y_label: the y axis's label.
    """
    figure, (axes,) = _panels(1, width=6.4, height=3.4)
    shown: set[str] = set()
    for segment in segments:
        if not segment.x:
            continue
        label = plain(segment.label) if segment.label not in shown else None
        shown.add(segment.label)
        axes.plot(segment.x, segment.y, linestyle="-" if segment.line else "--", marker=segment.marker,
                  color=segment.color or None, markersize=4, label=label)
    for x, text in boundaries:
        axes.axvline(x, color="grey", linestyle=":", linewidth=0.8)
        axes.annotate(plain(text), (x, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                      textcoords="offset points", fontsize=7, color="grey")
    values = [y for segment in segments for y in segment.y if np.isfinite(y)]
    if values and min(values) > 0 and max(values) > 10 * min(values):
        axes.set_yscale("log")
    axes.set_xlabel("epoch along the run")
    axes.set_ylabel(plain(y_label))
    axes.xaxis.get_major_locator().set_params(integer=True)
    _finish(axes)
    return figure


def path_panels(panels: Mapping[str, Sequence[Series]], *, y_label: str) -> Figure:
    """Side-by-side panels sharing the metric on y: x axis label → the series drawn on it.

    Args:
        panels: per panel, its x axis's label and the series it draws.
        y_label: the metric's name.
    """
    figure, axes_list = _panels(len(panels))
    for axes, (x_label, series) in zip(axes_list, panels.items()):
        for item in series:
            if not item.x:
                continue
            axes.plot(item.x, item.y, linestyle="-" if item.line else "none", marker=item.marker,
                      color=item.color or None, label=plain(item.label))
            for x, y, name in zip(item.x, item.y, item.names):
                axes.annotate(plain(name), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        axes.set_xlabel(plain(x_label))
        axes.set_ylabel(plain(y_label))
        _finish(axes)
    return figure


def bar_panels(panels: Mapping[str, Mapping[str, float]], *, horizontal: bool = False) -> Figure:
    """One bar chart per entry: title → (bar label → value).

    Args:
        panels: the charts, in order; each maps its bars' labels to their values.
        horizontal: draw the bars horizontally (for long labels, e.g. layer names).
    """
    longest = max((len(bars) for bars in panels.values()), default=1)
    height = max(2.6, 0.25 * longest + 1.0) if horizontal else 3.0
    figure, axes_list = _panels(len(panels), width=5.0 if horizontal else 3.2, height=height)
    for axes, (title, bars) in zip(axes_list, panels.items()):
        labels = [plain(label) for label in bars]
        draw = axes.barh if horizontal else axes.bar
        draw(labels, list(bars.values()), color="tab:blue")
        if horizontal:
            axes.invert_yaxis()  # the first layer on top
            axes.tick_params(axis="y", labelsize=7)
        axes.set_title(plain(title), fontsize=10)
        axes.grid(alpha=0.3, axis="x" if horizontal else "y")
    return figure


def _finish(axes: Axes) -> None:
    axes.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4), useOffset=False)  # no crowded MACs ticks
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)


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
    labels = max((len(row) for row in rows), default=0)  # long layer names need room on the left
    figure = Figure(figsize=(2.2 + 0.75 * len(columns) + 0.07 * labels, 1.2 + 0.35 * len(rows)), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="Reds")
    axes.set_xticks(range(len(columns)), labels=list(columns), rotation=45, ha="right")
    axes.set_yticks(range(len(rows)), labels=list(rows))
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            axes.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize=7)
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label=colorbar)
    svg = _figure_bytes(figure, "svg").decode("utf-8")  # text as paths: names need no escaping here
    return svg[svg.index("<svg"):]
