"""A sensitivity analysis as typed data (``analysis.json``) and a self-contained HTML page.

`spiralkit.spiral.analyze` measures it; this module only describes and draws it (the
report layer never imports `spiralkit.spiral`).

``analysis.json`` (schema ``spiralkit.analysis/1``)::

    {"schema": "spiralkit.analysis/1", "recipe": "...", "metric": "accuracy", "higher_is_better": true,
     "examples": 2000, "baseline": 99.1, "seconds": 12.3,
     "layers": [{"name": "fc1", "type": "Linear", "params": 48120, "param_share": 0.78,
                 "macs": 48000, "mac_share": 0.77,
                 "prune": [{"setting": 0.5, "metric": 99.0, "drop": 0.1}, ...],   # setting = sparsity
                 "quant": [{"setting": 4, "metric": 98.7, "drop": 0.4}, ...]}],  # setting = bits
     "groups": [{"id": "conv1", "channels": 6, "layers": ["conv1"],
                 "prune": [{"setting": 0.5, ...}]}]}                            # setting = channel ratio

Every ``metric`` is measured with *only* that layer (or channel group) changed and no
recovery; ``drop`` is how much worse it is than ``baseline`` (positive = worse, whatever
the metric's direction).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from spiralkit.export import atomic_write_text
from spiralkit.report.plots import heatmap_svg

__all__ = [
    "ANALYSIS_HTML",
    "ANALYSIS_JSON",
    "ANALYSIS_SCHEMA",
    "Analysis",
    "GroupAnalysis",
    "LayerAnalysis",
    "Sample",
    "analysis_html",
    "write_analysis",
]

ANALYSIS_SCHEMA = "spiralkit.analysis/1"
ANALYSIS_JSON = "analysis.json"
ANALYSIS_HTML = "analysis.html"


class _Plain(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sample(_Plain):
    """The metric at one setting (a sparsity, a channel ratio or a bit width).

    Attributes:
        setting: the sparsity or channel ratio in [0, 1), or the bit width.
        metric: the validation metric with only this layer or group changed.
        drop: ``baseline − metric`` for a higher-is-better metric, else ``metric − baseline``.
    """

    setting: float
    metric: float
    drop: float


class LayerAnalysis(_Plain):
    """One Linear/Conv layer: its cost and how the metric reacts to pruning or quantizing it alone.

    Attributes:
        name: the module's name.
        type: its class, e.g. ``Conv2d``.
        params: its parameters (weight and bias).
        param_share: ``params`` over all the model's parameters.
        macs: its multiply-accumulates for one example.
        mac_share: ``macs`` over the model's (the layers' shares sum to 1 when every MAC is in them).
        prune: magnitude pruning of its weight alone, one sample per sparsity.
        quant: its weight alone quantized, one sample per bit width (widest first).
    """

    name: str
    type: str
    params: int
    param_share: float
    macs: int
    mac_share: float
    prune: tuple[Sample, ...]
    quant: tuple[Sample, ...]


class GroupAnalysis(_Plain):
    """One structured channel group: the coupled channels pruned together.

    Attributes:
        id: the group's root layer (whose output channels define it).
        channels: its number of channels.
        layers: the layers computing its channels.
        prune: only this group pruned, one sample per channel ratio.
    """

    id: str
    channels: int
    layers: tuple[str, ...]
    prune: tuple[Sample, ...]


class Analysis(_Plain):
    """A model's sensitivity to pruning and quantizing each layer alone (see the module docstring).

    Attributes:
        recipe: the recipe's name.
        metric: the task metric's name.
        higher_is_better: the metric's direction.
        examples: the validation examples each metric is measured on.
        baseline: the unchanged model's metric.
        seconds: how long the scan took.
        layers: every Linear/Conv layer, in model order.
        groups: every prunable channel group.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    schema_: Literal["spiralkit.analysis/1"] = Field(default=ANALYSIS_SCHEMA, alias="schema")
    recipe: str
    metric: str
    higher_is_better: bool
    examples: int
    baseline: float
    seconds: float
    layers: tuple[LayerAnalysis, ...]
    groups: tuple[GroupAnalysis, ...]

    def to_json(self) -> str:
        """The analysis as JSON, ``schema`` first."""
        return self.model_dump_json(by_alias=True, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Analysis:
        """Parse what `to_json` wrote (pydantic's ValidationError on anything else)."""
        return cls.model_validate_json(text)


def write_analysis(analysis: Analysis, out: Path) -> list[Path]:
    """Write ``analysis.json`` and ``analysis.html`` into the existing directory ``out`` (atomically).

    Returns:
        The two files, JSON first.
    """
    paths = [out / ANALYSIS_JSON, out / ANALYSIS_HTML]
    atomic_write_text(paths[0], analysis.to_json())
    atomic_write_text(paths[1], analysis_html(analysis))
    return paths


# --------------------------------------------------------------------------- HTML


def _column_names(samples: Sequence[Sample], label: Callable[[float], str]) -> list[str]:
    return [label(s.setting) for s in samples]


def _sparsity(setting: float) -> str:
    return f"{100 * setting:g}%"


def _bits(setting: float) -> str:
    return f"{setting:g} bit"


def _heatmap(names: Sequence[str], rows: Sequence[Sequence[Sample]], columns: list[str], title: str, metric: str) -> str:
    if not names or not columns:
        return ""
    values = [[s.drop for s in row] for row in rows]
    return heatmap_svg(values, rows=names, columns=columns, title=title, colorbar=f"{metric} drop")


def _cell(value: str, *, numeric: bool = True) -> str:
    return f'<td class="num">{html.escape(value)}</td>' if numeric else f"<td>{html.escape(value)}</td>"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(_cell(c, numeric=i >= numeric_from) for i, c in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _metric(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4g}"


def _layer_rows(analysis: Analysis) -> tuple[list[str], list[list[str]]]:
    first = analysis.layers[0] if analysis.layers else None
    prune = _column_names(first.prune, _sparsity) if first else []
    quant = _column_names(first.quant, _bits) if first else []
    header = ["layer", "type", "params", "MACs", *(f"prune {c}" for c in prune), *quant]
    rows = [[layer.name, layer.type, f"{100 * layer.param_share:.1f}%", f"{100 * layer.mac_share:.1f}%",
             *(_metric(s.metric) for s in (*layer.prune, *layer.quant))] for layer in analysis.layers]
    return header, rows


def analysis_html(analysis: Analysis) -> str:
    """A self-contained page: a table of layers and groups, and heatmaps of the drops (inline SVG).

    Every name from the model or recipe is HTML-escaped.
    """
    metric = analysis.metric
    layer_header, layer_rows = _layer_rows(analysis)
    first = analysis.layers[0] if analysis.layers else None
    group_columns = _column_names(analysis.groups[0].prune, _sparsity) if analysis.groups else []
    group_rows = [[g.id, ", ".join(g.layers), str(g.channels), *(_metric(s.metric) for s in g.prune)]
                  for g in analysis.groups]
    names = [layer.name for layer in analysis.layers]
    figures = [
        _heatmap(names, [layer.prune for layer in analysis.layers],
                 _column_names(first.prune, _sparsity) if first else [], "one layer pruned (sparsity)", metric),
        _heatmap(names, [layer.quant for layer in analysis.layers],
                 _column_names(first.quant, _bits) if first else [], "one layer quantized", metric),
        _heatmap([g.id for g in analysis.groups], [g.prune for g in analysis.groups], group_columns,
                 "one channel group pruned (channel ratio)", metric),
    ]
    title = html.escape(f"{analysis.recipe}: sensitivity analysis")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:2px 8px}}td.num{{text-align:right}}th{{background:#f4f4f4}}
figure{{display:inline-block;margin:0 1em 1em 0}}</style></head>
<body><h1>{title}</h1>
<p>Validation {html.escape(metric)} of the unchanged model: {_metric(analysis.baseline)} on {analysis.examples}
examples. Each cell is the {html.escape(metric)} with <em>only</em> that layer (or channel group) pruned by
magnitude or quantized, without recovery; the heatmaps show the drop (positive = worse).
Scan time {analysis.seconds:.1f} s.</p>
<h2>Layers</h2>
<p>params and MACs: the layer's share of the model's.</p>
{_table(layer_header, layer_rows, numeric_from=2)}
<h2>Channel groups</h2>
{_table(["group", "layers", "channels", *(f"prune {c}" for c in group_columns)], group_rows, numeric_from=2)
 if group_rows else "<p>No prunable channel group.</p>"}
{"".join(f"<figure>{svg}</figure>" for svg in figures if svg)}
</body></html>
"""
