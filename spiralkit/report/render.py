"""Writing the report: ``report.json``, ``report.md`` and the terminal table."""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from spiralkit.export import atomic_write_text
from spiralkit.report.types import Metrics, Report

REPORT_JSON = "report.json"
REPORT_MARKDOWN = "report.md"
COLUMNS = ("stage", "metric", "val", "sparsity", "nonzero", "size", "MACs", "ms", "kept", "s")
_SHORT = {"sparsity": "sparse", "nonzero": "nnz"}


def size_text(num_bytes: float) -> str:
    """A size in bytes as people read it: ``950 B``, ``1.02 KB``, ``3.4 MB``."""
    for unit in ("B", "KB", "MB"):
        if num_bytes < 1000:
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.3g} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.3g} GB"


def count_text(value: float) -> str:
    """A count as people read it: ``950``, ``266k``, ``1.2M``."""
    for unit in ("", "k", "M"):
        if abs(value) < 1000:
            return f"{value:.0f}" if unit == "" else f"{value:.3g}{unit}"
        value /= 1000
    return f"{value:.3g}G"


def _cells(stage: str, m: Metrics, *, kept: str = "", seconds: str = "") -> list[str]:
    return [
        stage,
        f"{m.metric:.2f}",
        f"{m.val_metric:.2f}",
        f"{100 * m.sparsity:.1f}%",
        count_text(m.nonzero_params),
        size_text(m.size_bytes),
        count_text(m.macs),
        f"{m.latency_ms:.3f}",
        kept,
        seconds,
    ]


def report_rows(report: Report) -> list[list[str]]:
    """The table's rows: baseline, student, each round, pruned, final."""
    rows = [_cells("baseline", report.baseline)]
    if report.student is not None:
        rows.append(_cells("student", report.student))
    for r in report.rounds:
        rows.append(
            _cells(f"round {r.index}", r, kept="yes" if r.accepted else f"no: {r.reason}", seconds=f"{r.seconds:.1f}")
        )
    if report.pruned is not None:
        rows.append(_cells("pruned", report.pruned))
    if report.final is not None:
        rows.append(_cells("final", report.final))
    return rows


def summary(report: Report) -> str:
    """One line: the metric before and after, how much smaller, why the spiral stopped."""
    if report.final is None:
        return "run not finished"
    base, final = report.baseline, report.final
    ratio = base.nonzero_params / max(final.nonzero_params, 1)
    size_ratio = base.size_bytes / max(final.size_bytes, 1)
    quantized = ""
    if report.quantization is not None:
        q = report.quantization
        quantized = f"quantized: {q.kind}, {'/'.join(map(str, sorted(set(q.bits.values()))))} bits ({q.method}); "
    return (
        f"{quantized}{report.task.metric}: {base.metric:.2f} → {final.metric:.2f} "
        f"({final.metric - base.metric:+.2f}); non-zero weights {ratio:.1f}x fewer; "
        f"size {size_ratio:.1f}x smaller; stopped: {report.stopped}"
    )


def prediction_lines(report: Report) -> list[str]:
    """For each latency-constrained round: the latency its table predicted, the one measured, the error."""
    return [
        f"round {r.index} latency on {r.prediction_runtime}: predicted {r.predicted_latency_ms:.3f} ms, "
        f"measured {r.measured_latency_ms:.3f} ms (prediction error {100 * r.prediction_error:+.1f}%)"
        for r in report.rounds if r.prediction_error is not None
    ]


def caption_lines(report: Report) -> list[str]:
    """What the table's caption says: why rounds were rolled back, the summary, how latency was measured."""
    m = report.measurement
    notes = [f"round {r.index} rolled back: {r.reason}" for r in report.rounds if not r.accepted]
    notes += prediction_lines(report)
    timing = f"latency: median of {m.repeats} at batch {m.batch_size}, {m.threads} thread(s)"
    if m.clock != "wall":
        timing += f", {m.clock} time"
    if report.final is not None and report.final.latency_ms > 0:
        base, final = report.baseline.latency_ms, report.final.latency_ms
        timing += (f"; {base:.3f} ms ({report.baseline.latency_runtime}) → {final:.3f} ms "
                   f"({report.final.latency_runtime}), {base / final:.1f}x faster (measured)")
    return [*notes, summary(report), timing]


def console_table(report: Report) -> Table:
    """The report as a rich table for the terminal (fits 80 columns; rollback reasons below it)."""
    table = Table(
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        pad_edge=False,
        title=f"spiralkit — {report.name}",
        caption="\n".join(caption_lines(report)),
    )
    columns = [c for c in COLUMNS if c != "kept"]
    for column in columns:
        table.add_column(_SHORT.get(column, column), justify="left" if column == "stage" else "right", no_wrap=True)
    kept_at = COLUMNS.index("kept")
    for row in report_rows(report):
        stage = row[0] + ("" if not row[kept_at] else " ✓" if row[kept_at] == "yes" else " ✗")
        table.add_row(stage, *row[1:kept_at], *row[kept_at + 1 :])
    return table


def markdown(report: Report) -> str:
    """The report as a Markdown document."""
    m = report.measurement
    lines = [
        f"# spiralkit report — {report.name}",
        "",
        f"Task metric: **{report.task.metric}** ({'higher' if report.task.higher_is_better else 'lower'} is better), "
        "on held-out test data; `val` is the validation split that decided keep/roll back.",
        f"Latency: median of {m.repeats} runs after {m.warmup} warm-up, batch {m.batch_size}, {m.threads} thread(s)"
        + (f", {m.clock} time." if m.clock != "wall" else "."),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in report_rows(report)]
    lines += ["", summary(report), ""]
    if predictions := prediction_lines(report):
        lines += [*(f"- {line}" for line in predictions), ""]
    return "\n".join(lines)


def write_report(report: Report, run_dir: Path) -> None:
    """Write ``report.json`` and ``report.md`` into ``run_dir`` (atomically)."""
    atomic_write_text(Path(run_dir) / REPORT_JSON, report.to_json() + "\n")
    atomic_write_text(Path(run_dir) / REPORT_MARKDOWN, markdown(report))


def print_report(report: Report, console: Console | None = None) -> None:
    """Print the report's table."""
    (console or Console()).print(console_table(report))
