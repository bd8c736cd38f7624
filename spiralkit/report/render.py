"""Writing the report: ``report.json``, ``report.md`` and the terminal table."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from spiralkit.export import atomic_write_text
from spiralkit.report.types import Metrics, Report

_COLUMNS = ("stage", "metric", "val", "sparsity", "nonzero", "size", "MACs", "latency ms", "kept", "s")


def _size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def _cells(stage: str, m: Metrics, *, kept: str = "", seconds: str = "") -> list[str]:
    return [
        stage,
        f"{m.metric:.2f}",
        f"{m.val_metric:.2f}",
        f"{100 * m.sparsity:.1f}%",
        f"{m.nonzero_params:,}",
        _size(m.size_bytes),
        f"{m.macs:,}",
        f"{m.latency_ms:.3f}",
        kept,
        seconds,
    ]


def report_rows(report: Report) -> list[list[str]]:
    """The table's rows: baseline, each round, final."""
    rows = [_cells("baseline", report.baseline)]
    for r in report.rounds:
        rows.append(
            _cells(f"round {r.index} → {100 * r.target_sparsity:.1f}%", r,
                   kept="yes" if r.accepted else f"no: {r.reason}", seconds=f"{r.seconds:.1f}")
        )
    if report.final is not None:
        rows.append(_cells("final", report.final))
    return rows


def _summary(report: Report) -> str:
    if report.final is None:
        return "run not finished"
    base, final = report.baseline, report.final
    ratio = base.nonzero_params / max(final.nonzero_params, 1)
    size_ratio = base.size_bytes / max(final.size_bytes, 1)
    return (
        f"{report.task.metric}: {base.metric:.2f} → {final.metric:.2f} "
        f"({final.metric - base.metric:+.2f}); non-zero weights {ratio:.1f}x fewer; "
        f"size {size_ratio:.1f}x smaller; stopped: {report.stopped}"
    )


def console_table(report: Report) -> Table:
    """The report as a rich table for the terminal."""
    m = report.measurement
    table = Table(
        title=f"spiralkit — {report.name}",
        caption=f"{_summary(report)}\nlatency: median of {m.repeats} at batch {m.batch_size}, {m.threads} thread(s)",
    )
    for column in _COLUMNS:
        table.add_column(column, justify="left" if column in ("stage", "kept") else "right")
    for row in report_rows(report):
        table.add_row(*row)
    return table


def markdown(report: Report) -> str:
    """The report as a Markdown document."""
    m = report.measurement
    lines = [
        f"# spiralkit report — {report.name}",
        "",
        f"Task metric: **{report.task.metric}** ({'higher' if report.task.higher_is_better else 'lower'} is better), "
        "on held-out test data; `val` is the validation split that decided keep/roll back.",
        f"Latency: median of {m.repeats} runs after {m.warmup} warm-up, batch {m.batch_size}, {m.threads} thread(s).",
        "",
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "|".join("---" for _ in _COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in report_rows(report)]
    lines += ["", _summary(report), ""]
    return "\n".join(lines)


def write_report(report: Report, run_dir: Path) -> None:
    """Write ``report.json`` and ``report.md`` into ``run_dir`` (atomically)."""
    atomic_write_text(Path(run_dir) / "report.json", report.to_json() + "\n")
    atomic_write_text(Path(run_dir) / "report.md", markdown(report))


def print_report(report: Report, console: Console | None = None) -> None:
    """Print the report's table."""
    (console or Console()).print(console_table(report))
