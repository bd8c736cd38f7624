"""Run reports: typed data, JSON/Markdown/HTML writers and the terminal table."""

from spiralkit.report.html import (
    COMPARE_HTML,
    REPORT_HTML,
    CompareRun,
    layer_sparsity,
    write_compare_html,
    write_html_report,
)
from spiralkit.report.render import console_table, markdown, print_report, write_report
from spiralkit.report.types import SCHEMA, Measurement, Metrics, Outcome, QuantInfo, Report, RoundRecord, TaskInfo

__all__ = [
    "COMPARE_HTML",
    "REPORT_HTML",
    "CompareRun",
    "SCHEMA",
    "Measurement",
    "Metrics",
    "Outcome",
    "QuantInfo",
    "Report",
    "RoundRecord",
    "TaskInfo",
    "console_table",
    "layer_sparsity",
    "markdown",
    "print_report",
    "write_compare_html",
    "write_html_report",
    "write_report",
]
