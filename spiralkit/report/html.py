"""HTML pages: ``report.html`` for one run, ``compare.html`` for runs side by side.

Each page is one self-contained file: simple CSS in the page, plots as inline SVG (drawn by
`spiralkit.report.plots`), no script and nothing fetched from the network, so it opens from
a disk, an e-mail or a CI artefact alike, and prints. Everything that comes from a run
directory (names, reasons, the recipe, layer names) is HTML-escaped: run directories may
come from others.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from spiralkit.errors import SpiralError
from spiralkit.export import atomic_write_text, load_state
from spiralkit.report.curves import Curves
from spiralkit.report.plots import Series, bar_panels, figure_svg, loss_plot, path_panels, rounds_plot
from spiralkit.report.render import COLUMNS, caption_lines, count_text, report_rows, size_text, summary
from spiralkit.report.types import Metrics, Report

__all__ = [
    "COMPARE_HTML",
    "REPORT_HTML",
    "CompareRun",
    "compare_html",
    "layer_sparsity",
    "pareto_front",
    "report_html",
    "write_compare_html",
    "write_html_report",
]

REPORT_HTML = "report.html"
COMPARE_HTML = "compare.html"

_CSS = """
body { font-family: system-ui, sans-serif; color: #222; max-width: 1180px; margin: 1.5em auto; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.rolled-back td { color: #a33; } tr.kept td { color: #262; }
.plot svg { max-width: 100%; height: auto; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
p.note { color: #555; font-size: 0.9em; }
@media print {
  body { max-width: none; margin: 0; font-size: 10pt; }
  .plot, table { break-inside: avoid; }
  pre { white-space: pre-wrap; }
}
"""


def _e(value: object) -> str:
    """``value`` as HTML text: everything from a run directory goes through here."""
    return html.escape(str(value), quote=True)


def _page(title: str, body: Sequence[str]) -> str:
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        *body,
        "</body>",
        "</html>",
        "",
    ])


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, row_classes: Sequence[str] = ()) -> str:
    head = "".join(f"<th>{_e(cell)}</th>" for cell in header)
    lines = ["<table>", f"<thead><tr>{head}</tr></thead>", "<tbody>"]
    for index, row in enumerate(rows):
        css = row_classes[index] if index < len(row_classes) else ""
        cells = "".join(f"<td>{_e(cell)}</td>" for cell in row)
        lines.append(f'<tr class="{css}">{cells}</tr>' if css else f"<tr>{cells}</tr>")
    return "\n".join([*lines, "</tbody>", "</table>"])


def _plot(title: str, svg: str) -> str:
    return f'<h2>{_e(title)}</h2>\n<div class="plot">{svg}</div>'


def layer_sparsity(state: Mapping[str, Tensor]) -> dict[str, float]:
    """The fraction of zeros in each weight tensor (a ``weight`` with two or more dimensions).

    Args:
        state: a state dict, e.g. ``load_state(RUN_DIR / "model.safetensors")``.

    Returns:
        Tensor name → zeros / elements, in the state dict's order.
    """
    return {
        name: float((tensor == 0).sum()) / tensor.numel()
        for name, tensor in state.items()
        if name.endswith("weight") and tensor.dim() >= 2 and tensor.numel() > 0
    }


def _path(report: Report) -> list[tuple[str, Metrics]]:
    """The spiral's path: baseline, student, each kept round, the final model."""
    steps: list[tuple[str, Metrics]] = [("baseline", report.baseline)]
    if report.student is not None:
        steps.append(("student", report.student))
    steps += [(f"round {r.index}", r) for r in report.rounds if r.accepted]
    if report.final is not None:
        steps.append(("final", report.final))
    return steps


_AXES: dict[str, str] = {  # Metrics field → axis label
    "sparsity": "sparsity",
    "macs": "MACs",
    "size_bytes": "size (bytes)",
    "latency_ms": "latency (ms)",
}


def _rounds_svg(report: Report) -> str:
    def series(label: str, accepted: bool, marker: str, color: str) -> Series:
        chosen = [r for r in report.rounds if r.accepted is accepted]
        return Series(label, [r.index for r in chosen], [r.metric for r in chosen], marker=marker, color=color)

    figure = rounds_plot(series("kept", True, "o", "tab:green"), series("rolled back", False, "X", "tab:red"),
                         baseline=report.baseline.metric,
                         final=report.final.metric if report.final is not None else None,
                         y_label=report.task.metric)
    return figure_svg(figure)


def _losses_svg(report: Report, curves: Curves | None) -> str | None:
    """The training loss of the baseline and of every round's recovery, one after the other.

    A round is kept or rolled back as the report says; curves of rounds the report does not
    have (a round interrupted before its state was saved) are left out.
    """
    if curves is None:
        return None
    rounds = {r.index: r for r in report.rounds}
    segments, boundaries, epoch = [], [], 0
    for curve in curves.trainings:
        record = rounds.get(curve.round) if curve.round is not None else None
        if curve.round is not None and record is None:
            continue
        x = [float(epoch + i + 1) for i in range(len(curve.losses))]
        if record is None:
            segments.append(Series("baseline training", x, list(curve.losses), color="tab:grey"))
        else:
            boundaries.append((epoch + 0.5, str(record.index)))
            kept = record.accepted
            segments.append(Series("kept round" if kept else "rolled-back round", x, list(curve.losses), line=kept,
                                   marker="o" if kept else "X", color="tab:green" if kept else "tab:red"))
        epoch += len(curve.losses)
    if not any(s.x for s in segments):
        return None
    return figure_svg(loss_plot(segments, boundaries=boundaries, y_label="mean training loss per epoch"))


def _path_svg(report: Report) -> str:
    steps = _path(report)
    names = [name if name in ("baseline", "final") else "" for name, _ in steps]
    panels = {
        label: [Series("spiral", [float(getattr(m, key)) for _, m in steps], [m.metric for _, m in steps], names=names)]
        for key, label in _AXES.items()
        if key != "latency_ms"
    }
    return figure_svg(path_panels(panels, y_label=report.task.metric))


def _before_after_svg(report: Report) -> str | None:
    if report.final is None:
        return None
    panels = {
        "latency (ms)": {"baseline": report.baseline.latency_ms, "final": report.final.latency_ms},
        "size (KB)": {"baseline": report.baseline.size_bytes / 1024, "final": report.final.size_bytes / 1024},
    }
    return figure_svg(bar_panels(panels))


def _layers_svg(report: Report, layers: Mapping[str, float] | None) -> str | None:
    panels: dict[str, Mapping[str, float]] = {}
    if layers:
        panels["sparsity per weight tensor"] = layers
    if report.quantization is not None and report.quantization.bits:
        panels["bits per layer"] = {name: float(bits) for name, bits in report.quantization.bits.items()}
    return figure_svg(bar_panels(panels, horizontal=True)) if panels else None


def _row_class(row: Sequence[str]) -> str:
    kept = row[COLUMNS.index("kept")]
    return "" if not kept else "kept" if kept == "yes" else "rolled-back"


def report_html(
    report: Report, *, recipe_text: str | None = None, layers: Mapping[str, float] | None = None,
    curves: Curves | None = None,
) -> str:
    """One run's report as a self-contained HTML page.

    Args:
        report: the run's report (a report written by an older spiralkit renders without
            what it lacks).
        recipe_text: the run's ``recipe.yaml``, shown verbatim (None: not shown).
        layers: per-layer sparsity (`layer_sparsity`; None: no per-layer chart unless the
            report has quantization bits).
        curves: the run's training curves (None: no training-loss plot, as for a run written
            before they were kept).

    Returns:
        The page's text.
    """
    m = report.measurement
    rows = report_rows(report)
    body = [
        f"<h1>spiralkit report — {_e(report.name)}</h1>",
        f"<p>Task metric: <b>{_e(report.task.metric)}</b> "
        f"({'higher' if report.task.higher_is_better else 'lower'} is better), on held-out test data; "
        "<code>val</code> is the validation split that decided keep/roll back. "
        f"Latency: median of {m.repeats} runs after {m.warmup} warm-up, batch {m.batch_size}, "
        f"{m.threads} thread(s).</p>",
        f"<p><b>{_e(summary(report))}</b></p>",
        _table(COLUMNS, rows, row_classes=[_row_class(row) for row in rows]),
        *(f'<p class="note">{_e(line)}</p>' for line in caption_lines(report)[:-2]),
    ]
    if report.rounds:
        body.append(_plot(f"{report.task.metric} per round", _rounds_svg(report)))
    losses = _losses_svg(report, curves)
    if losses is not None:
        body.append(_plot("Training loss per epoch: baseline, then each round's recovery", losses))
        body.append('<p class="note">Dotted lines: the start of each round (its number on top). A recovery '
                    "that distils minimises another loss than the baseline's training.</p>")
    body.append(_plot(f"{report.task.metric} along the spiral: baseline → kept rounds → final", _path_svg(report)))
    for title, svg in (("Before and after", _before_after_svg(report)), ("Per layer", _layers_svg(report, layers))):
        if svg is not None:
            body.append(_plot(title, svg))
    if recipe_text is not None:
        body += ["<h2>Recipe</h2>", f"<pre>{_e(recipe_text)}</pre>"]
    return _page(f"spiralkit report — {report.name}", body)


def write_html_report(
    report: Report, run_dir: Path, *, recipe_text: str | None, weights: Path | None, curves: Curves | None = None,
) -> Path:
    """Write ``report.html`` into ``run_dir`` (atomically).

    Args:
        report: the run's report.
        run_dir: the run directory.
        recipe_text: the run's recipe as YAML (None: not shown).
        weights: the final model's safetensors file, for per-layer sparsity; skipped when
            None or missing (a run written before that file existed, or not finished).
        curves: the run's training curves, for the training-loss plot (None: no such plot).

    Returns:
        The file written.

    Raises:
        ModelError: ``weights`` exists but is not a readable safetensors file.
        StorageError: the page cannot be written.
    """
    layers = layer_sparsity(load_state(weights)) if weights is not None and weights.exists() else None
    path = Path(run_dir) / REPORT_HTML
    atomic_write_text(path, report_html(report, recipe_text=recipe_text, layers=layers, curves=curves))
    return path


@dataclass(frozen=True)
class CompareRun:
    """One run on the compare page.

    Attributes:
        name: how the page names the run (e.g. its directory's name).
        report: the run's report.
        recipe_changes: the recipe's dotted keys that differ from the first run's, each with
            the first run's value and this run's (empty for the first run; None when a
            recipe is missing).
    """

    name: str
    report: Report
    recipe_changes: Sequence[tuple[str, object, object]] | None = None


def _result(report: Report) -> Metrics:
    """What a run reached: its final model, else its last kept round, else its baseline."""
    return report.final or next((r for r in reversed(report.rounds) if r.accepted), report.baseline)


def pareto_front(points: Sequence[tuple[float, float]], *, higher_is_better: bool) -> list[int]:
    """The indices of the points no other point beats: x (a cost) lower, y (the metric) better.

    A point is dominated when another is at least as good on both axes and better on one.

    Args:
        points: (cost, metric) pairs.
        higher_is_better: the metric's direction.

    Returns:
        The front's indices, sorted by cost.
    """
    sign = 1.0 if higher_is_better else -1.0
    scored = [(x, sign * y) for x, y in points]

    def dominated(i: int) -> bool:
        x, y = scored[i]
        return any(ox <= x and oy >= y and (ox, oy) != (x, y) for ox, oy in scored)

    return sorted((i for i in range(len(points)) if not dominated(i)), key=lambda i: (points[i][0], -scored[i][1]))


def _front_svg(runs: Sequence[CompareRun], task_metric: str, higher_is_better: bool) -> str:
    results = [_result(run.report) for run in runs]
    names = [run.name for run in runs]
    panels: dict[str, list[Series]] = {}
    for key, label in _AXES.items():
        if key == "sparsity":
            continue
        points = [(float(getattr(m, key)), m.metric) for m in results]
        front = pareto_front(points, higher_is_better=higher_is_better)
        panels[label] = [
            Series("runs", [x for x, _ in points], [y for _, y in points], names=names, line=False, color="tab:grey"),
            Series("Pareto front", [points[i][0] for i in front], [points[i][1] for i in front],
                   marker="D", color="tab:red"),
        ]
    return figure_svg(path_panels(panels, y_label=task_metric))


def compare_html(runs: Sequence[CompareRun]) -> str:
    """Runs side by side as a self-contained HTML page: a table, Pareto fronts, recipe differences.

    Args:
        runs: the runs, the first the reference of the recipe differences.

    Returns:
        The page's text.

    Raises:
        SpiralError: no runs, or runs whose task metrics differ (they cannot share an axis).
    """
    if not runs:
        raise SpiralError("nothing to compare: give at least one run")
    task = runs[0].report.task
    others = sorted({run.report.task.metric for run in runs} - {task.metric})
    if others:
        raise SpiralError(f"cannot compare runs with different task metrics: {task.metric} and {', '.join(others)}")
    header = ["run", "recipe", task.metric, "size", "MACs", "latency (ms)", "sparsity", "finished"]
    rows = []
    for run in runs:
        m = _result(run.report)
        rows.append([run.name, run.report.name, f"{m.metric:.2f}", size_text(m.size_bytes), count_text(m.macs),
                     f"{m.latency_ms:.3f}", f"{100 * m.sparsity:.1f}%", "yes" if run.report.final else "no"])
    body = [
        f"<h1>spiralkit — {len(runs)} runs compared</h1>",
        f"<p>Task metric: <b>{_e(task.metric)}</b> ({'higher' if task.higher_is_better else 'lower'} is better). "
        "Each run shows its final model (an unfinished run: its last kept round, else its baseline).</p>",
        _table(header, rows),
        _plot(f"Pareto front: {task.metric} against latency, MACs and size",
              _front_svg(runs, task.metric, task.higher_is_better)),
        f"<h2>Recipe differences against {_e(runs[0].name)}</h2>",
    ]
    for run in runs[1:]:
        body.append(f"<h3>{_e(run.name)}</h3>")
        if run.recipe_changes is None:
            body.append('<p class="note">not known: a recipe is missing</p>')
        elif run.recipe_changes:
            body.append(_table(["key", runs[0].name, run.name],
                               [[key, _value(first), _value(this)] for key, first, this in run.recipe_changes]))
        else:
            body.append('<p class="note">no difference in the keys that decide results</p>')
    return _page("spiralkit — runs compared", body)


def _value(value: object) -> str:
    return "(absent)" if value is None else str(value)


def write_compare_html(runs: Sequence[CompareRun], out_dir: Path) -> Path:
    """Write ``compare.html`` into ``out_dir`` (created if missing; atomically).

    Raises:
        SpiralError: see `compare_html`; or ``out_dir`` cannot be created.
        StorageError: the page cannot be written.
    """
    text = compare_html(runs)
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpiralError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    path = Path(out_dir) / COMPARE_HTML
    atomic_write_text(path, text)
    return path
