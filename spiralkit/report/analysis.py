"""A sensitivity analysis as typed data (``analysis.json``) and a self-contained HTML page.

`spiralkit.spiral.analyze` measures it; this module only describes and draws it (the
report layer never imports `spiralkit.spiral`).

``analysis.json`` (schema ``spiralkit.analysis/2``)::

    {"schema": "spiralkit.analysis/2", "recipe": "...", "metric": "accuracy", "higher_is_better": true,
     "examples": 2000, "baseline": 99.1, "seconds": 12.3,
     "layers": [{"name": "fc1", "type": "Linear", "params": 48120, "param_share": 0.78,
                 "macs": 48000, "mac_share": 0.77, "latency_share": 0.70,
                 "prune": [{"setting": 0.5, "metric": 99.0, "drop": 0.1}, ...],   # setting = sparsity
                 "quant": [{"setting": 4, "metric": 98.7, "drop": 0.4}, ...]}],  # setting = bits
     "groups": [{"id": "conv1", "channels": 6, "layers": ["conv1"],
                 "prune": [{"setting": 0.5, ...}]}],                            # setting = channel ratio
     "heads": [{"module": "encoder.layer.0.attention", "heads": 12, "param_share": 0.02, "mac_share": 0.1,
                "latency_share": 0.12, "prune": [{"setting": 0.5, ...}]}],      # setting = fraction of heads removed
     "blocks": [{"module": "encoder.layer.0", "influence": 0.14, "params": 1, "param_share": 0.05,
                 "mac_share": 0.16, "latency_share": 0.16, "metric": 0.91, "drop": 0.09}],  # the block removed
     "latency_ms": 35.2, "latency_batch": 32,
     "latency": [{"name": "fc1", "type": "Linear", "ms": 0.1, "share": 0.7}, ...]}     # every innermost module

Every ``metric`` is measured with *only* that layer (channel group, attention layer's heads,
block) changed and no recovery; ``drop`` is how much worse it is than ``baseline`` (positive =
worse, whatever the metric's direction). Latency shares are of one forward pass at the
recipe's measurement batch, timed per module with forward hooks
(`spiralkit.measure.latency_by_module`); a module's share includes its children's. The
innermost modules (that ran while none of their submodules did: the leaves, and e.g.
``nn.MultiheadAttention``, which computes with its ``out_proj`` weight without calling it) add up
to less than 1 by what runs outside them (functional ops in a parent's ``forward``, Python,
the timing hooks). Version 1 files
(without heads, blocks and latency) still load.
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
    "BlockAnalysis",
    "GroupAnalysis",
    "HeadAnalysis",
    "LayerAnalysis",
    "ModuleLatency",
    "Sample",
    "analysis_html",
    "write_analysis",
]

ANALYSIS_SCHEMA = "spiralkit.analysis/2"
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
        latency_share: its share of the measured forward pass (None: not measured, or it did not run).
    """

    name: str
    type: str
    params: int
    param_share: float
    macs: int
    mac_share: float
    prune: tuple[Sample, ...]
    quant: tuple[Sample, ...]
    latency_share: float | None = None


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


class HeadAnalysis(_Plain):
    """One attention layer: its heads removed (the lowest-scored first), the rest of the model unchanged.

    Attributes:
        module: the attention module's name.
        heads: its number of heads.
        param_share: its parameters over the model's.
        mac_share: its MACs (projections and attention products) over the model's.
        latency_share: its share of the measured forward pass (None: not measured).
        prune: one sample per fraction of its heads removed (``heads·(1 − setting)`` rounded are kept).
    """

    module: str
    heads: int
    param_share: float
    mac_share: float
    latency_share: float | None = None
    prune: tuple[Sample, ...]


class BlockAnalysis(_Plain):
    """One removable residual block or transformer layer (depth pruning), removed alone.

    Attributes:
        module: the block's name.
        influence: its block influence ``1 − cos(input, output)`` (`spiralkit.graph.blocks`; low = removable).
        params: its parameters.
        param_share: ``params`` over the model's.
        mac_share: its MACs over the model's.
        latency_share: its share of the measured forward pass (None: not measured).
        metric: the metric without it.
        drop: how much worse that is than the baseline.
    """

    module: str
    influence: float
    params: int
    param_share: float
    mac_share: float
    latency_share: float | None = None
    metric: float
    drop: float


class ModuleLatency(_Plain):
    """One innermost module's measured time in a forward pass (see the module docstring).

    Attributes:
        name: the module's name.
        type: its class.
        ms: median milliseconds per forward pass.
        share: ``ms`` over the whole pass's median.
    """

    name: str
    type: str
    ms: float
    share: float


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
        heads: every attention layer whose heads can be pruned.
        blocks: every removable residual block or transformer layer.
        latency_ms: the median forward pass with timing hooks (None: not measured).
        latency_batch: the batch size it was measured at.
        latency: every innermost module that ran, in model order.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    schema_: Literal["spiralkit.analysis/1", "spiralkit.analysis/2"] = Field(default=ANALYSIS_SCHEMA, alias="schema")
    recipe: str
    metric: str
    higher_is_better: bool
    examples: int
    baseline: float
    seconds: float
    layers: tuple[LayerAnalysis, ...]
    groups: tuple[GroupAnalysis, ...]
    heads: tuple[HeadAnalysis, ...] = ()
    blocks: tuple[BlockAnalysis, ...] = ()
    latency_ms: float | None = None
    latency_batch: int | None = None
    latency: tuple[ModuleLatency, ...] = ()

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


def _share(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _layer_rows(analysis: Analysis) -> tuple[list[str], list[list[str]]]:
    first = analysis.layers[0] if analysis.layers else None
    prune = _column_names(first.prune, _sparsity) if first else []
    quant = _column_names(first.quant, _bits) if first else []
    header = ["layer", "type", "params", "MACs", "latency", *(f"prune {c}" for c in prune), *quant]
    rows = [[layer.name, layer.type, _share(layer.param_share), _share(layer.mac_share), _share(layer.latency_share),
             *(_metric(s.metric) for s in (*layer.prune, *layer.quant))] for layer in analysis.layers]
    return header, rows


def _heads_section(analysis: Analysis) -> tuple[str, str]:
    """The attention heads' table and heatmap (empty strings without attention layers)."""
    if not analysis.heads:
        return "", ""
    columns = _column_names(analysis.heads[0].prune, _sparsity)
    rows = [[h.module, str(h.heads), _share(h.param_share), _share(h.mac_share), _share(h.latency_share),
             *(_metric(s.metric) for s in h.prune)] for h in analysis.heads]
    table = _table(["attention layer", "heads", "params", "MACs", "latency", *(f"heads removed {c}" for c in columns)],
                   rows, numeric_from=1)
    text = ("<h2>Attention heads</h2><p>Each cell: that layer alone with the given fraction of its heads removed "
            "(the lowest-scored first).</p>" + table)
    figure = _heatmap([h.module for h in analysis.heads], [h.prune for h in analysis.heads], columns,
                      "one attention layer's heads removed", analysis.metric)
    return text, figure


def _blocks_section(analysis: Analysis) -> tuple[str, str]:
    """The removable blocks' table and heatmap (empty strings without blocks)."""
    if not analysis.blocks:
        return "", ""
    rows = [[b.module, f"{b.influence:.3f}", _share(b.param_share), _share(b.mac_share), _share(b.latency_share),
             _metric(b.metric), _metric(b.drop)] for b in analysis.blocks]
    table = _table(["block", "influence", "params", "MACs", "latency", "metric without it", "drop"], rows, numeric_from=1)
    text = ("<h2>Layers and blocks (depth)</h2><p>Each row: the model with that residual block or transformer "
            "layer removed alone. Influence is 1 − cos(input, output) of the block: low means it changes little.</p>"
            + table)
    samples = [(Sample(setting=1.0, metric=b.metric, drop=b.drop),) for b in analysis.blocks]
    figure = _heatmap([b.module for b in analysis.blocks], samples, ["removed"], "one block removed", analysis.metric)
    return text, figure


LATENCY_ROWS = 15
"""The latency table shows the slowest innermost modules, this many at most."""


def _latency_section(analysis: Analysis) -> str:
    if analysis.latency_ms is None:
        return ""
    slowest = sorted(analysis.latency, key=lambda m: -m.ms)[:LATENCY_ROWS]
    outside = 1.0 - sum(m.share for m in analysis.latency)
    rows = [[m.name, m.type, f"{m.ms:.3f}", _share(m.share)] for m in slowest]
    rows.append(["(outside them: functional ops, Python, hooks)", "", f"{outside * analysis.latency_ms:.3f}",
                 _share(outside)])
    return (f"<h2>Measured latency</h2><p>One forward pass at batch {analysis.latency_batch}: "
            f"{analysis.latency_ms:.3f} ms (median, timed per module with forward hooks). "
            f"The {len(slowest)} slowest of {len(analysis.latency)} innermost modules (that ran while none of "
            "their submodules did):</p>"
            + _table(["module", "type", "ms", "share"], rows, numeric_from=2))


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
    heads_text, heads_figure = _heads_section(analysis)
    blocks_text, blocks_figure = _blocks_section(analysis)
    figures += [heads_figure, blocks_figure]
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
<p>params, MACs and latency: the layer's share of the model's (latency: of one measured forward pass).</p>
{_table(layer_header, layer_rows, numeric_from=2)}
<h2>Channel groups</h2>
{_table(["group", "layers", "channels", *(f"prune {c}" for c in group_columns)], group_rows, numeric_from=2)
 if group_rows else "<p>No prunable channel group.</p>"}
{heads_text}
{blocks_text}
{_latency_section(analysis)}
{"".join(f"<figure>{svg}</figure>" for svg in figures if svg)}
</body></html>
"""
