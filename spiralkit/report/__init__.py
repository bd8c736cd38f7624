"""Run reports: typed data, JSON/Markdown writers and the terminal table."""

from spiralkit.report.render import console_table, markdown, print_report, write_report
from spiralkit.report.types import SCHEMA, Measurement, Metrics, Outcome, QuantInfo, Report, RoundRecord, TaskInfo

__all__ = [
    "SCHEMA",
    "Measurement",
    "Metrics",
    "Outcome",
    "QuantInfo",
    "Report",
    "RoundRecord",
    "TaskInfo",
    "console_table",
    "markdown",
    "print_report",
    "write_report",
]
