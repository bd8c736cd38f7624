"""Latency-constrained structured pruning: per-group widths that keep the most importance within a latency.

The predicted latency of a model whose channel groups keep widths ``k`` is

    T(k) = c + Σ_blocks table[block](in_width(k), out_width(k))

where the table (`spiralkit.latency.table`) holds each conv/linear block's measured latency
on the grid of widths. What the blocks do not cover — residual additions, shortcuts, pooling,
layout conversions between blocks, the runtime's per-call cost — is calibrated by end-to-end
measurements: with the unpruned model's ``T_full`` alone, ``T(k) = c + s·S(k)`` with ``s = 1``
and ``c = T_full − S(full)``, ``S`` the sum of table entries; with the narrowest model's
``T_narrow`` too (what `calibration_ms` measures, interleaved), the line through both points,
``s = (T_full − T_narrow) / (S(full) − S(narrow))``. On ResNet-20 the rest is not constant —
additions and layout conversions move activations whose size follows the widths — and the
two-point line predicts pruned models several times better than the constant.

`choose_widths` is greedy: starting from full widths, it repeatedly moves the one group whose
step down to a narrower grid width loses the least importance per millisecond saved,

    argmin_{g, k' < k_g}  (I_g(k_g) − I_g(k')) / (T(k) − T(k with k_g = k')),   T saving > 0,

until ``T(k) ≤ target``; then it gives back widths that still fit, most importance per
millisecond first. ``I_g(k)`` is the sum of the ``k`` best channel scores of group ``g``
(any `spiralkit.prune.structured_importance` criterion), each group's scores divided by their
mean so that groups compare (as the global scope does). A move to a width the table shows to
be no faster is never taken, so slow widths (e.g. not multiples of 16 on AVX-512) are skipped.
Coupled channels stay consistent because widths are chosen per `ChannelGroup` — every member
(residual streams, option-A shortcuts) loses the same root channels — and the plan is made by
`spiralkit.prune.structured.Planner.with_counts`.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from spiralkit.graph.groups import ChannelGroup, Member
from spiralkit.latency.runtimes import LatencyError, interleaved_ms
from spiralkit.measure import Clock
from spiralkit.latency.table import Block, LatencyTable, build_table, table_blocks, width_grid
from spiralkit.prune.apply import apply_plan
from spiralkit.prune.importance import LossFn
from spiralkit.prune.plan import PrunePlan
from spiralkit.prune.structured import Planner, StructuredPrune, planner

GroupWeight = Literal["equal", "layers", "weights"]
"""How groups' importance compares in `choose_widths` (see `group_weights`)."""

__all__ = ["GroupWeight", "LatencyPlan", "calibration_ms", "choose_widths", "narrowest_counts", "narrowest_model",
           "plan_for_latency", "table_for"]


@dataclass(frozen=True)
class LatencyPlan:
    """A latency-constrained plan and what it predicts.

    Attributes:
        plan: the channels each group keeps.
        predicted_ms: ``T(k)`` of the chosen widths.
        full_ms: ``T`` of the model unpruned (the calibration's measured latency).
        counts: group id → kept width.
        offset_ms, scale: the calibration ``T = offset + scale·S`` (see the module docstring).
    """

    plan: PrunePlan
    predicted_ms: float
    full_ms: float
    counts: dict[str, int]
    offset_ms: float = 0.0
    scale: float = 1.0


@dataclass(frozen=True)
class _Side:
    """A block side's share in one channel group: ``removed[k]`` of its channels go at group width ``k``."""

    group: str
    removed: dict[int, int]


@dataclass(frozen=True)
class _Layer:
    block: Block
    ins: tuple[_Side, ...]
    outs: tuple[_Side, ...]

    def widths(self, counts: Mapping[str, int]) -> tuple[int, int]:
        out = self.block.out_size - sum(s.removed[counts[s.group]] for s in self.outs)
        if self.block.shape.depthwise:
            return out, out
        return self.block.in_size - sum(s.removed[counts[s.group]] for s in self.ins), out


def _group_widths(group: ChannelGroup, step: int, max_ratio: float) -> tuple[int, ...]:
    """The grid widths a group may keep: multiples of ``lcm(step, blocks)``, at least ``(1 − max_ratio)`` of it."""
    multiple = math.lcm(step, group.num_blocks)
    floor = group.size * (1.0 - max_ratio)
    widths = [w for w in width_grid(group.size, multiple) if w >= floor and w % group.num_blocks == 0]
    return tuple(widths) or (group.size,)


def _removed(member: Member, kept: frozenset[int]) -> int:
    return sum(1 for root in member.roots if root not in kept)


def _weights_per_channel(block: Block, role: str) -> int:
    """The conv/linear weights one channel of ``block``'s ``role`` side holds, at full widths."""
    shape = block.shape
    kernel = math.prod(shape.kernel) if shape.kernel else 1
    if shape.depthwise:
        return kernel if role == "out" else 0
    groups = max(shape.groups, 1)
    return (block.in_size // groups) * kernel if role == "out" else (block.out_size // groups) * kernel


def group_weights(groups: Sequence[ChannelGroup], blocks: Sequence[Block], how: GroupWeight) -> dict[str, float]:
    """What one channel of each group is worth, relative to the others, before its own score.

    Each group's channel scores are divided by their mean (a channel of the group is worth 1
    on average); this weight multiplies them:

    * ``equal`` — 1 for every group: a channel of a residual stream that ten layers share is
      worth as much as one of a single convolution.
    * ``layers`` — the number of conv/linear layers the group's channels live in (either side),
      so cutting a stream shared by many layers costs what cutting each of them would.
    * ``weights`` — the number of conv/linear weights one channel of the group holds, over
      every layer it touches (at full widths): wide, deep layers' channels are worth more.

    A group touching no conv/linear layer weighs 1.
    """
    by_name = {b.name: b for b in blocks}
    weights: dict[str, float] = {}
    for group in groups:
        sides = [(by_name[m.module], m.role) for m in group.members if m.module in by_name]
        if how == "layers":
            value = float(len({block.name for block, _ in sides}))
        elif how == "weights":
            value = float(sum(_weights_per_channel(block, role) for block, role in sides))
        else:
            value = 1.0
        weights[group.id] = value if value > 0 else 1.0
    return weights


class _Problem:
    """The groups, their allowed widths and importance, and the blocks they change."""

    def __init__(self, plan_for: Planner, blocks: Sequence[Block], table: LatencyTable, *, step: int,
                 max_ratio: float, weigh: GroupWeight = "equal") -> None:
        self.table = table
        self.widths = {g.id: _group_widths(g, step, max_ratio) for g in plan_for.channels}
        self.gain: dict[str, dict[int, float]] = {}
        kept: dict[str, dict[int, frozenset[int]]] = {}
        weight = group_weights(plan_for.channels, blocks, weigh)
        for g in plan_for.channels:
            scores = plan_for.scores.channels[g.id].double()
            scores = weight[g.id] * scores / scores.mean().clamp_min(1e-300)
            kept[g.id] = {k: frozenset(plan_for.keep(g, k)) for k in self.widths[g.id]}
            self.gain[g.id] = {k: float(scores[list(kept[g.id][k])].sum()) for k in self.widths[g.id]}
        sides: dict[tuple[str, str], list[_Side]] = {}
        for g in plan_for.channels:
            for m in g.members:
                removed = {k: _removed(m, keep) for k, keep in kept[g.id].items()}
                sides.setdefault((m.module, m.role), []).append(_Side(group=g.id, removed=removed))
        self.layers = [_Layer(b, tuple(sides.get((b.name, "in"), ())), tuple(sides.get((b.name, "out"), ())))
                       for b in blocks]
        self.touching = {gid: [i for i, layer in enumerate(self.layers)
                               if any(s.group == gid for s in (*layer.ins, *layer.outs))] for gid in self.widths}

    def layer_ms(self, index: int, counts: Mapping[str, int]) -> float:
        layer = self.layers[index]
        return self.table.ms(layer.block.shape, *layer.widths(counts))

    def blocks_ms(self, counts: Mapping[str, int]) -> float:
        return sum(self.layer_ms(i, counts) for i in range(len(self.layers)))

    def saving(self, counts: Mapping[str, int], group: str, width: int) -> float:
        """Milliseconds saved by moving ``group`` to ``width`` (negative: slower)."""
        moved = {**counts, group: width}
        return sum(self.layer_ms(i, counts) - self.layer_ms(i, moved) for i in self.touching[group])


def _best_move(problem: _Problem, counts: dict[str, int], *, down: bool, budget: float) -> tuple[str, int] | None:
    """Down: the move losing least importance per ms saved. Up: the one gaining most per ms spent within ``budget``."""
    best, best_ratio = None, math.inf
    for gid, widths in problem.widths.items():
        for width in widths:
            if (width >= counts[gid]) if down else (width <= counts[gid]):
                continue
            saved = problem.saving(counts, gid, width)
            lost = problem.gain[gid][counts[gid]] - problem.gain[gid][width]
            if down and saved > 1e-9:
                ratio = lost / saved
            elif not down and -saved <= budget + 1e-12:
                ratio = lost / max(-saved, 1e-9)  # lost < 0: more importance; most per ms first
            else:
                continue
            if ratio < best_ratio:
                best, best_ratio = (gid, width), ratio
    return best


def narrowest_counts(plan_for: Planner, *, step: int, max_ratio: float = 1.0) -> dict[str, int]:
    """Every group at the narrowest width `choose_widths` may give it."""
    return {g.id: _group_widths(g, step, max_ratio)[0] for g in plan_for.channels}


def narrowest_model(model: nn.Module, plan_for: Planner, *, step: int, max_ratio: float = 1.0) -> nn.Module:
    """A pruned copy of ``model`` with every group at its narrowest width (`narrowest_counts`)."""
    return apply_plan(copy.deepcopy(model), plan_for.with_counts(narrowest_counts(plan_for, step=step, max_ratio=max_ratio)),
                      mode="remove")


def calibration_ms(
    model: nn.Module, plan_for: Planner, example: Tensor, *, runtime: str, threads: int, step: int,
    max_ratio: float = 1.0, **timing: Any,
) -> tuple[float, float]:
    """The measured latencies of ``model`` and of its narrowest pruned copy, interleaved.

    ``timing`` goes to `spiralkit.latency.runtimes.interleaved_ms` (clock, repeats, passes…).
    """
    narrow = narrowest_model(model, plan_for, step=step, max_ratio=max_ratio)
    full_ms, narrow_ms = interleaved_ms([(model, example), (narrow, example)], runtime=runtime, threads=threads, **timing)
    return full_ms, narrow_ms


def choose_widths(
    plan_for: Planner,
    blocks: Sequence[Block],
    table: LatencyTable,
    *,
    target_ms: float,
    measured_ms: float,
    narrowest_ms: float | None = None,
    step: int = 8,
    max_ratio: float = 1.0,
    strict: bool = True,
    weigh: GroupWeight = "equal",
) -> LatencyPlan:
    """Per-group widths with the most importance whose predicted latency is at most ``target_ms``.

    Args:
        plan_for: the model traced and scored (`spiralkit.prune.structured.planner`).
        blocks: the model's blocks (`spiralkit.latency.table.table_blocks`).
        table: latencies of those blocks at the grid widths, measured on the runtime,
            threads and batch the target is for.
        target_ms: the latency to reach.
        measured_ms: the unpruned model's measured latency.
        narrowest_ms: the measured latency of the model with every group at its narrowest
            width (`narrowest_counts`); with it the calibration is a line, not an offset.
        step: the grid step; widths are multiples of it (or the full width).
        max_ratio: at most this fraction of a group's channels may go.
        strict: a target that even the narrowest widths miss is an error; otherwise the
            narrowest widths are returned (a spiral round gets as close as it may).
        weigh: how groups' importance compares (`group_weights`).

    Returns:
        The plan and its predicted latency.

    Raises:
        LatencyError: ``strict`` and even the narrowest allowed widths predict more than ``target_ms``,
            or the table has the narrowest widths slower than none pruned (nothing to plan with).
    """
    problem = _Problem(plan_for, blocks, table, step=step, max_ratio=max_ratio, weigh=weigh)
    counts = {g.id: g.size for g in plan_for.channels}
    full_sum = problem.blocks_ms(counts)
    narrow_sum = problem.blocks_ms(narrowest_counts(plan_for, step=step, max_ratio=max_ratio))
    env = table.env
    if strict and narrow_sum > full_sum:  # (equal: already at the narrowest widths, out of reach below)
        raise LatencyError(
            f"latency target {target_ms:.3f} ms cannot be planned on {env.runtime} (batch {env.batch}, "
            f"{env.threads} thread(s)): its latency table shows no time saved by narrower widths (the blocks "
            f"take {narrow_sum:.3f} ms at the narrowest widths allowed, {full_sum:.3f} ms unpruned); prune for "
            f"'measure: macs' or 'params' instead, or plan on another 'runtime' or batch size")
    scale = 1.0
    if narrowest_ms is not None and full_sum - narrow_sum > 1e-9 and measured_ms > narrowest_ms:
        scale = (measured_ms - narrowest_ms) / (full_sum - narrow_sum)
    offset = measured_ms - scale * full_sum
    narrowest = offset + scale * narrow_sum
    if narrowest > target_ms and strict:
        raise LatencyError(
            f"latency target {target_ms:.3f} ms is out of reach on {env.runtime} (batch {env.batch}, "
            f"{env.threads} thread(s)): the narrowest widths allowed predict {narrowest:.3f} ms "
            f"(unpruned: {measured_ms:.3f} ms); ask for a smaller 'target_reduction'")
    budget = (target_ms - offset) / scale  # in table milliseconds
    total = full_sum
    while total > budget and (move := _best_move(problem, counts, down=True, budget=0.0)) is not None:
        counts[move[0]] = move[1]
        total = problem.blocks_ms(counts)
    while (move := _best_move(problem, counts, down=False, budget=budget - total)) is not None:
        counts[move[0]] = move[1]
        total = problem.blocks_ms(counts)
    return LatencyPlan(plan=plan_for.with_counts(counts), predicted_ms=offset + scale * total, full_ms=measured_ms,
                       counts=dict(counts), offset_ms=offset, scale=scale)


def table_for(
    plan_for: Planner, model: nn.Module, example: Tensor, *, runtime: str, threads: int, step: int, **build: Any
) -> tuple[list[Block], LatencyTable]:
    """The model's blocks and their latency table, measured only at widths a plan can give them.

    A block side in no prunable group is measured at its full width only. ``build`` goes to
    `spiralkit.latency.table.build_table` (cache directory, repeats…).
    """
    blocks = table_blocks(model, example)
    sides: dict[tuple[str, str], list[tuple[ChannelGroup, Member]]] = {}
    for g in plan_for.channels:
        for m in g.members:
            sides.setdefault((m.module, m.role), []).append((g, m))
    widths = {b.name: (_side_widths(sides.get((b.name, "in"), []), b.in_size, step),
                       _side_widths(sides.get((b.name, "out"), []), b.out_size, step)) for b in blocks}
    table = build_table(model, example, runtime=runtime, threads=threads, step=step, widths=widths, **build)
    return blocks, table


def _side_widths(touching: Sequence[tuple[ChannelGroup, Member]], size: int, step: int) -> tuple[int, ...]:
    """The widths a block side can have under any plan of `choose_widths`.

    Untouched by any group: its full width only. Touched by one group whose every channel
    spans the same number ``r`` of the side's entries (a linear layer reading a flattened
    conv output has ``r`` = the pixels per channel): ``size − r·(removed channels)`` at each
    width the group may keep. Otherwise (several groups, e.g. a concatenation): the grid.
    """
    if not touching:
        return (size,)
    if len(touching) == 1:
        group, member = touching[0]
        spans = Counter(member.roots)
        if len(spans) == group.size and len(set(spans.values())) == 1:
            span = next(iter(spans.values()))
            return tuple(sorted({size - span * (group.size - k) for k in _group_widths(group, step, 1.0)}))
    return width_grid(size, step)


def plan_for_latency(
    model: nn.Module,
    config: StructuredPrune,
    *,
    example: Tensor,
    target_ms: float,
    table: LatencyTable | None = None,
    runtime: str = "ort",
    threads: int = 1,
    step: int = 8,
    clock: Clock = "wall",
    measured_ms: float | None = None,
    batches: Iterable[tuple[Any, Tensor]] = (),
    loss_fn: LossFn | None = None,
) -> PrunePlan:
    """One-shot latency-constrained plan: the most important channels within ``target_ms``.

    Args:
        model: the model to plan for (not changed).
        config: criterion, include/exclude and scope of the channels (``ratio`` is unused).
        example: the input batch the latency is for (its batch size is the table's).
        target_ms: the latency to reach on ``runtime``.
        table: a latency table of the model's blocks; built (or read from the cache) when None.
        runtime: the runtime of the target (and of the table when it is built).
        threads: intra-op threads of the runtime.
        step: width grid step.
        clock: ``wall`` or ``cpu`` time, of the table when it is built (see
            `spiralkit.measure.measure_call`).
        measured_ms: the model's measured latency; when None, it and the narrowest model's are
            measured (`calibration_ms`) to calibrate the prediction.
        batches, loss_fn: data for data-driven criteria (as `plan_pruning`).

    Returns:
        The plan (apply it with `spiralkit.prune.apply_plan`).

    Raises:
        LatencyError: unknown runtime, or a target the narrowest widths miss.
    """
    plan_for = planner(model, config, example=example, batches=batches, loss_fn=loss_fn)
    if table is None:
        blocks, table = table_for(plan_for, model, example, runtime=runtime, threads=threads, step=step, clock=clock)
    else:
        blocks = table_blocks(model, example)
    env = table.env
    narrowest_ms = None
    if measured_ms is None:
        measured_ms, narrowest_ms = calibration_ms(model, plan_for, example, runtime=env.runtime, threads=env.threads,
                                                   step=step, clock=env.clock)
    return choose_widths(plan_for, blocks, table, target_ms=target_ms, measured_ms=measured_ms,
                         narrowest_ms=narrowest_ms, step=step).plan
