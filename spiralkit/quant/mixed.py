"""Mixed precision: per-layer weight bit widths from a sensitivity scan, under a size budget.

Two steps, each a plain function:

1. `sensitivity_scan` measures, for every layer ``l`` and bit width ``b``, the task metric
   when *only* ``l``'s weights are quantized to ``b`` bits (the rest stays float) — the
   per-layer sensitivity analysis of e.g. HAWQ (Dong et al. 2019) and of Wu et al. 2020
   ("Integer Quantization for Deep Learning Inference"), measured directly rather than
   estimated from the Hessian. The quantizer is the compact artefact's
   (`spiralkit.quant.nonzero.quantize_nonzero_`: symmetric, per output channel by default,
   zeros kept), so the table predicts what `save_compressed` will store.
2. `choose_bits` picks one width per layer minimising the predicted total loss — the sum of
   the per-layer drops, i.e. assuming the layers' errors add up — subject to the size
   budget::

       minimise  Σ_l drop(l, b_l)   subject to   Σ_l size(l, b_l) ≤ budget

   a multiple-choice knapsack, solved exactly by dynamic programming over the budget
   discretised into at most `MAX_BUDGET_UNITS` units (sizes rounded *up* to whole units,
   so a chosen assignment never exceeds the budget; with a budget of at most
   `MAX_BUDGET_UNITS` bytes the units are bytes and the solution is the exact optimum).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from spiralkit.patterns import first_unmatched, matches_any
from spiralkit.quant.affine import PerChannel, PerTensor, QuantError, check_bits
from spiralkit.quant.nonzero import quantize_nonzero_

__all__ = [
    "FLOAT_BITS",
    "MAX_BUDGET_UNITS",
    "SensitivityTable",
    "choose_bits",
    "quantizable_layers",
    "sensitivity_scan",
    "weight_counts",
]

DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
FLOAT_BITS = 32
"""The width `choose_bits` reports for layers kept in float (float32 weights)."""
MAX_BUDGET_UNITS = 20_000
"""Resolution of `choose_bits`' dynamic programme: the budget is split into at most this many units."""
_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class SensitivityTable:
    """The metric of the model with one layer quantized at a time.

    Attributes:
        baseline: The float model's metric.
        metrics: Layer name → bit width → metric with only that layer quantized.
    """

    baseline: float
    metrics: Mapping[str, Mapping[int, float]]

    @property
    def layers(self) -> tuple[str, ...]:
        """The scanned layers, in scan order."""
        return tuple(self.metrics)

    @property
    def bits(self) -> tuple[int, ...]:
        """The bit widths of the scan, ascending (every layer has every width)."""
        return tuple(sorted({b for row in self.metrics.values() for b in row}))

    def change(self, layer: str, bits: int) -> float:
        """``metric(layer at bits) − baseline`` (signed; its sign means nothing without the direction)."""
        return self._metric(layer, bits) - self.baseline

    def drop(self, layer: str, bits: int, *, higher_is_better: bool) -> float:
        """How much worse the metric gets (positive = worse) with only ``layer`` at ``bits``."""
        change = self.change(layer, bits)
        return -change if higher_is_better else change

    def _metric(self, layer: str, bits: int) -> float:
        if layer not in self.metrics:
            raise QuantError(f"layer {layer!r} is not in the sensitivity table; layers are: {', '.join(self.layers)}")
        row = self.metrics[layer]
        if bits not in row:
            raise QuantError(f"the sensitivity table has no {bits}-bit entry for {layer!r}; widths are {self.bits}")
        return row[bits]

    def __str__(self) -> str:
        """A table: one row per layer, one column per bit width, the metric change in each cell."""
        header = ["layer", *(f"{b} bit" for b in self.bits)]
        rows = [[name, *(f"{self.change(name, b):+.4g}" for b in self.bits)] for name in self.layers]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths)))

        title = f"metric change with only one layer quantized (baseline {self.baseline:.4g})"
        return "\n".join([title, line(header), "  ".join("-" * w for w in widths), *map(line, rows)])

    def to_json(self) -> str:
        """The table as JSON: ``{"baseline": ..., "metrics": {layer: {"bits": metric}}}``."""
        metrics = {name: {str(b): value for b, value in sorted(row.items())} for name, row in self.metrics.items()}
        return json.dumps({"baseline": self.baseline, "metrics": metrics}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> SensitivityTable:
        """Inverse of `to_json`.

        Raises:
            QuantError: The text is not a sensitivity table.
        """
        try:
            data = json.loads(text)
            metrics = {str(name): {int(b): float(v) for b, v in row.items()} for name, row in data["metrics"].items()}
            return cls(baseline=float(data["baseline"]), metrics=metrics)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise QuantError(f"not a sensitivity table: {exc}") from exc


# --------------------------------------------------------------------------- scan


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the Linear/Conv layers whose weights the compact quantizer handles."""
    return [name for name, m in model.named_modules() if name and isinstance(m, _LAYER_TYPES)]


def _check_layers(model: nn.Module, layers: Sequence[str]) -> None:
    known = quantizable_layers(model)
    unknown = [name for name in layers if name not in known]
    if unknown:
        raise QuantError(
            f"unknown layer name(s) {', '.join(map(repr, unknown))}: not Linear/Conv layers of "
            f"{type(model).__name__}; its layers are: {', '.join(known) or '(none)'}"
        )
    if not layers:
        raise QuantError(f"no layers to scan in {type(model).__name__}")


def sensitivity_scan(
    model: nn.Module,
    *,
    evaluate: Callable[[nn.Module], float],
    layers: Sequence[str] | None = None,
    bits: Sequence[int] = DEFAULT_BITS,
    granularity: PerTensor | PerChannel = PerChannel(),
) -> SensitivityTable:
    """Measure the metric with only one layer's weights quantized, for every layer and width.

    Each entry is ``evaluate(m)`` where ``m`` is a copy of ``model`` whose layer ``l`` has
    weights ``ŵ = q·s`` at ``b`` bits (`spiralkit.quant.nonzero.quantize_nonzero_`; zeros
    stay zero) and every other tensor is float. ``model`` is never modified: the scan works
    on one copy and restores the layer's weight after each entry. Costs
    ``1 + len(layers)·len(bits)`` calls of ``evaluate``.

    Args:
        model: The float model.
        evaluate: The metric of a model (e.g. validation accuracy); called with the copy.
        layers: Layer names (Linear/Conv); None scans all of them.
        bits: Bit widths, each 2..8.
        granularity: `PerChannel` (axis 0, the default) or `PerTensor` weight scales.

    Returns:
        The table.

    Raises:
        QuantError: An unknown layer name (all of them are named), no layers, or a bit
            width outside 2..8.
    """
    names = quantizable_layers(model) if layers is None else list(layers)
    _check_layers(model, names)
    widths = sorted({check_bits(b) for b in bits})
    if not widths:
        raise QuantError("sensitivity_scan needs at least one bit width")
    probe = copy.deepcopy(model)
    baseline = float(evaluate(probe))
    modules = dict(probe.named_modules())
    metrics: dict[str, dict[int, float]] = {}
    for name in names:
        weight = modules[name].weight
        original = weight.detach().clone()
        row: dict[int, float] = {}
        for b in widths:
            quantize_nonzero_(probe, {name: b}, granularity=granularity)
            row[b] = float(evaluate(probe))
            with torch.no_grad():
                weight.copy_(original)
        metrics[name] = row
    return SensitivityTable(baseline=baseline, metrics=metrics)


# --------------------------------------------------------------------------- choose


def weight_counts(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, int]:
    """Number of weight elements per Linear/Conv layer (biases excluded), for `choose_bits`."""
    names = quantizable_layers(model) if layers is None else list(layers)
    _check_layers(model, names)
    modules = dict(model.named_modules())
    return {name: modules[name].weight.numel() for name in names}


SizeOf = Callable[[str, int], int] | Mapping[str, int]


def _size_function(size_of: SizeOf) -> Callable[[str, int], int]:
    """Bytes of a layer at a width: ``size_of`` itself, or ``ceil(count · b / 8)`` from element counts."""
    if not isinstance(size_of, Mapping):
        return size_of
    counts = dict(size_of)

    def from_counts(layer: str, bits: int) -> int:
        if layer not in counts:
            raise QuantError(f"no weight count given for layer {layer!r}")
        return math.ceil(counts[layer] * bits / 8)

    return from_counts


def _float_layers(table: SensitivityTable, keep_float: Sequence[str]) -> set[str]:
    if (pattern := first_unmatched(keep_float, table.layers)) is not None:
        raise QuantError(
            f"keep_float pattern {pattern!r} matches no layer of the table; layers are: {', '.join(table.layers)}"
        )
    return {name for name in table.layers if matches_any(name, keep_float)}


def choose_bits(
    table: SensitivityTable,
    *,
    size_of: SizeOf,
    budget_bytes: int,
    higher_is_better: bool,
    keep_float: Sequence[str] = (),
) -> dict[str, int]:
    """Per-layer bit widths with the least predicted metric loss whose weights fit the budget.

    Solves ``min Σ_l max(drop(l, b_l), 0)  s.t.  Σ_l size(l, b_l) ≤ budget`` over the widths of
    the table (see the module docstring): a multiple-choice knapsack, by dynamic programming
    over the budget in ``u = ceil(budget / MAX_BUDGET_UNITS)``-byte units, ``O(layers ·
    widths · budget / u)``. Negative drops (a layer that *improves* the metric when
    quantized) count as 0: they are evaluation noise, not a gain to spend elsewhere. Among
    assignments of equal predicted loss the wider widths win.

    Args:
        table: From `sensitivity_scan`.
        size_of: Bytes of a layer's weights at a width, ``size_of(layer, bits)``; or a mapping
            layer → weight element count, giving ``ceil(count · bits / 8)`` (see
            `weight_counts`). Scales and biases are not counted unless ``size_of`` does.
        budget_bytes: Largest total size of the table's layers, float ones included.
        higher_is_better: The metric's direction (accuracy: True; loss, perplexity: False).
        keep_float: ``fnmatch`` patterns of layers kept in float; they get `FLOAT_BITS`
            (32) and their float size counts against the budget.

    Returns:
        Layer → bits, for every layer of the table.

    Raises:
        QuantError: The budget is below the smallest possible size (every layer at its
            fewest bits, float layers at 32; the message gives both numbers), a
            ``keep_float`` pattern matches no layer, or a size is negative.
    """
    size = _size_function(size_of)
    floats = _float_layers(table, keep_float)
    widths = sorted(table.bits, reverse=True)  # widest first: it wins ties
    quantized = [name for name in table.layers if name not in floats]
    float_bytes = sum(_checked_size(size, name, FLOAT_BITS) for name in floats)
    sizes = {name: [_checked_size(size, name, b) for b in widths] for name in quantized}
    minimum = float_bytes + sum(min(row) for row in sizes.values())
    if budget_bytes < minimum:
        raise QuantError(
            f"budget of {budget_bytes} bytes is below the smallest possible size, {minimum} bytes "
            f"(every layer at {min(widths)} bits" + (", float layers at 32 bits)" if floats else ")")
        )
    chosen = dict.fromkeys(floats, FLOAT_BITS)
    if quantized:
        losses = {name: [max(table.drop(name, b, higher_is_better=higher_is_better), 0.0) for b in widths]
                  for name in quantized}
        picks = _knapsack(sizes, losses, budget_bytes - float_bytes)
        chosen.update({name: widths[j] for name, j in picks.items()})
    return {name: chosen[name] for name in table.layers}


def _checked_size(size: Callable[[str, int], int], layer: str, bits: int) -> int:
    value = int(size(layer, bits))
    if value < 0:
        raise QuantError(f"size_of({layer!r}, {bits}) is negative: {value}")
    return value


def _knapsack(sizes: Mapping[str, Sequence[int]], losses: Mapping[str, Sequence[float]], budget: int) -> dict[str, int]:
    """Multiple-choice knapsack: one choice index per layer, least total loss within ``budget``.

    ``best[c]`` is the least loss of the layers so far within ``c`` units; adding a layer,
    ``best'[c] = min_j best[c − w_j] + v_j``. Choices are tried in order and only a strictly
    smaller loss replaces an earlier one, so earlier (wider) choices win ties.
    """
    unit = max(math.ceil(budget / MAX_BUDGET_UNITS), 1)
    capacity = budget // unit
    best = np.zeros(capacity + 1)
    picks = []
    for name in sizes:
        new = np.full(capacity + 1, np.inf)
        pick = np.zeros(capacity + 1, dtype=np.int16)
        for j, (nbytes, loss) in enumerate(zip(sizes[name], losses[name], strict=True)):
            w = math.ceil(nbytes / unit)
            if w > capacity:
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[w:] = best[: capacity + 1 - w] + loss
            better = candidate < new
            new[better], pick[better] = candidate[better], j
        best = new
        picks.append(pick)
    if not np.isfinite(best[capacity]):
        # Only possible when rounding sizes up to units made the smallest assignment too big.
        raise QuantError(
            f"budget of {budget} bytes cannot be met at a resolution of {unit} bytes; raise it slightly"
        )
    result: dict[str, int] = {}
    c = capacity
    for name, pick in zip(reversed(list(sizes)), reversed(picks), strict=True):
        j = int(pick[c])
        result[name] = j
        c -= math.ceil(sizes[name][j] / unit)
    return {name: result[name] for name in sizes}

