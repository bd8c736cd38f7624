"""Structured pruning: which channels, heads and blocks to remove — the config and the planning.

The flow is two plain function calls::

    plan = plan_pruning(model, StructuredPrune(ratio=0.5), example=x)   # decide
    apply_plan(model, plan, mode="remove")                              # act

`plan_pruning` traces the model into coupled channel groups, attention heads and removable
blocks (`spiralkit.graph`), scores them (`spiralkit.prune.structured_importance`) and keeps the
best. The `PrunePlan` it returns (`spiralkit.prune.plan`) is plain data — for each group the
kept indices of every member layer, by module *name* — so it is saved as JSON and replays on
a fresh copy of the model. `apply_plan` (`spiralkit.prune.apply`) masks or removes what the
plan drops; `save_pruned` / `load_pruned` (`spiralkit.prune.saved`) store a pruned model.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from spiralkit.errors import PruneError
from spiralkit.graph.attention import HeadGroup
from spiralkit.graph.blocks import find_blocks
from spiralkit.graph.forward import detach_cached
from spiralkit.graph.groups import (
    RNN_TYPES,
    ChannelGroup,
    Example,
    Member,
    ModelGroups,
    call_model,
    trace_groups,
)
from spiralkit.graph.layers import is_conv1d
from spiralkit.graph.slicing import Mode
from spiralkit.patterns import first_unmatched, matches_any
from spiralkit.prune.apply import apply_plan
from spiralkit.prune.importance import LossFn, Magnitude
from spiralkit.prune.plan import BlockPlan, GroupPlan, HeadPlan, MemberPlan, PrunePlan, SkippedPlan
from spiralkit.prune.structured_importance import ChannelCriterion, StructureScores, score_structures
from spiralkit.prune.unstructured import Scope

__all__ = [
    "Planner",
    "StructuredPrune",
    "plan_pruning",
    "planner",
    "prune_structured",
]

_PRODUCERS = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding, *RNN_TYPES)


class StructuredPrune(BaseModel):
    """Structured pruning: which channels, heads and blocks to remove, and by which criterion.

    Attributes:
        criterion: Importance of a channel or head (magnitude L1/L2, taylor,
            mean_activation, apoz, bn_scale, norm_ratio, random). Default: L2 magnitude.
        ratio: Fraction of the channels of each group (and of the heads of each attention
            layer) to remove, in [0, 1).
        scope: ``layerwise`` removes ``ratio`` of every group; ``global`` ranks all channels
            together (each group's scores divided by their mean, so groups compare) and
            removes ``ratio`` of all of them, so groups end with different widths.
        include: Name patterns (fnmatch) of the layers whose outputs may be removed —
            convolutions, linear layers, RNNs, embeddings, attention layers, blocks. A group
            is pruned only when every layer computing it is included.
        exclude: Name patterns of layers to keep whole. A pattern matching no such layer is
            an error.
        round_to: Kept channel counts are rounded to a multiple of this (e.g. 8 for fast
            kernels); at least one multiple is kept.
        heads: Prune attention heads whole (otherwise attention layers are left alone).
        depth: Number of residual blocks / transformer layers to remove, lowest block
            influence first (see `spiralkit.graph.blocks`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["structured"] = "structured"
    criterion: ChannelCriterion = Magnitude(norm=2)
    ratio: float = Field(ge=0, lt=1)
    scope: Scope = Scope.LAYERWISE
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    round_to: int = Field(default=1, ge=1)
    heads: bool = True
    depth: int = Field(default=0, ge=0)


# --------------------------------------------------------------------------- planning


def _select(names: Iterable[str], include: Sequence[str], exclude: Sequence[str]) -> set[str]:
    """Names matching an ``include`` and no ``exclude`` pattern (Selector semantics).

    Raises:
        PruneError: A pattern matches none of ``names``.
    """
    names = list(names)
    if (pattern := first_unmatched((*include, *exclude), names)) is not None:
        known = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "") or "none"
        raise PruneError(f"pattern {pattern!r} matches no prunable layer; prunable layers are: {known}")
    return {n for n in names if matches_any(n, include) and not matches_any(n, exclude)}


def _is_producer(module: nn.Module) -> bool:
    return isinstance(module, _PRODUCERS) or is_conv1d(module)


def _candidate_names(model: nn.Module, groups: ModelGroups, blocks: Sequence[str]) -> list[str]:
    names = [name for name, module in model.named_modules() if isinstance(module, _PRODUCERS) or is_conv1d(module)]
    return names + [h.module for h in groups.heads] + list(blocks)


def _producers(model: nn.Module, group: ChannelGroup) -> list[str]:
    return [m.module for m in group.producers() if _is_producer(model.get_submodule(m.module))]


def _kept_count(size: int, ratio: float, multiple: int) -> int:
    """``size·(1 − ratio)`` rounded to the nearest multiple of ``multiple`` (at least one, at most ``size``)."""
    kept = math.floor(size * (1.0 - ratio) / multiple + 0.5) * multiple
    return min(size, max(multiple, kept))


def _keep(scores: Tensor, count: int, blocks: Sequence[int]) -> tuple[int, ...]:
    """The ``count`` best channels; with blocks, the best ``count / #blocks`` of every block.

    Ties are broken by index: the lower index is removed first.
    """
    if not blocks:
        order = torch.argsort(scores, stable=True)
        return tuple(sorted(order[len(scores) - count :].tolist()))
    members: dict[int, list[int]] = defaultdict(list)
    for channel, block in enumerate(blocks):
        members[block].append(channel)
    per_block = count // len(members)
    kept: list[int] = []
    for channels in members.values():
        index = torch.as_tensor(channels)
        order = torch.argsort(scores[index], stable=True)
        kept += index[order[len(channels) - per_block :]].tolist()
    return tuple(sorted(kept))


def _multiple(group: ChannelGroup, round_to: int) -> int:
    return math.lcm(round_to, group.num_blocks)


class _Width(NamedTuple):
    """One prunable unit for counting: a channel group (channels) or an attention layer (heads)."""

    name: str
    size: int
    multiple: int


def _kept_counts(units: Sequence[_Width], scores: dict[str, Tensor], config: StructuredPrune) -> dict[str, int]:
    """How many channels (or heads) each unit keeps, layer-wise or from one global ranking.

    Layer-wise, every unit keeps ``size·(1 − ratio)``. Globally, each unit's scores are
    divided by their mean (so that units compare), the lowest ``ratio`` of all of them are
    dropped, and each unit keeps what is left of it; both round to the unit's ``multiple``.
    """
    if config.scope == Scope.LAYERWISE or not units:
        return {u.name: _kept_count(u.size, config.ratio, u.multiple) for u in units}
    flat = torch.cat([scores[u.name] / scores[u.name].mean().clamp_min(1e-300) for u in units])
    dropped = torch.zeros(flat.numel(), dtype=torch.bool)
    dropped[torch.argsort(flat, stable=True)[: round(config.ratio * flat.numel())]] = True
    counts, start = {}, 0
    for unit in units:
        removed = int(dropped[start : start + unit.size].sum())
        start += unit.size
        counts[unit.name] = _kept_count(unit.size, removed / unit.size, unit.multiple)
    return counts


def _inside(name: str, blocks: Iterable[str]) -> bool:
    return any(name == b or name.startswith(b + ".") for b in blocks)


def _group_plan(group: ChannelGroup, keep: Sequence[int], removed_blocks: Sequence[str]) -> GroupPlan | None:
    kept = set(keep)
    members = tuple(
        MemberPlan(module=m.module, role=m.role, size=m.size,
                   keep=tuple(sorted([local for local, root in zip(m.local, m.roots) if root in kept] + list(_outside(m)))))
        for m in group.members
        if not _inside(m.module, removed_blocks)
    )
    if not members:
        return None
    return GroupPlan(id=group.id, size=group.size, keep=tuple(keep), members=members)


def _outside(member: Member) -> tuple[int, ...]:
    """Indices of a member that belong to other groups (e.g. other inputs of a concatenation)."""
    if len(member.local) == member.size:
        return ()
    return tuple(sorted(set(range(member.size)) - set(member.local)))


def _choose_blocks(model: nn.Module, blocks: Sequence[Any], depth: int, selected: set[str]) -> tuple[BlockPlan, ...]:
    """The ``depth`` selected blocks of lowest influence, keeping one block per container."""
    if depth == 0:
        return ()
    left = {name: len(m) for name, m in model.named_modules() if isinstance(m, (nn.Sequential, nn.ModuleList))}
    chosen: list[BlockPlan] = []
    for block in sorted((b for b in blocks if b.module in selected), key=lambda b: b.influence):
        container = block.module.rpartition(".")[0]
        if len(chosen) < depth and left[container] > 1:
            left[container] -= 1
            chosen.append(BlockPlan(module=block.module, influence=block.influence))
    if len(chosen) < depth:
        names = ", ".join(b.module for b in blocks) or "none"
        raise PruneError(f"depth={depth} but only {len(chosen)} blocks can be removed; removable residual blocks: {names}")
    return tuple(chosen)


@dataclass(frozen=True)
class Planner:
    """Plans for any ratio from one tracing and one scoring of a model (see `planner`).

    Call it with a ratio to get the `PrunePlan` that `plan_pruning` would return for the
    same config with that ratio; the spiral searches ratios this way to hit a MACs,
    parameter or latency target without re-scoring.
    """

    config: StructuredPrune
    channels: tuple[ChannelGroup, ...]
    heads: tuple[HeadGroup, ...]
    scores: StructureScores
    blocks: tuple[BlockPlan, ...]
    skipped: tuple[SkippedPlan, ...]

    def __call__(self, ratio: float) -> PrunePlan:
        config = self.config.model_copy(update={"ratio": ratio})
        removed = [b.module for b in self.blocks]
        channels, heads = (self.channels, self.heads) if ratio > 0 else ((), ())
        return PrunePlan(
            groups=_plan_groups(channels, self.scores, config, removed),
            heads=_plan_heads(heads, self.scores, config, removed),
            blocks=self.blocks,
            skipped=self.skipped,
        )

    def keep(self, group: ChannelGroup, count: int) -> tuple[int, ...]:
        """The ``count`` best root channels of ``group`` (a multiple of its blocks), as `__call__` keeps them."""
        return _keep(self.scores.channels[group.id], count, group.blocks)

    def with_counts(self, counts: Mapping[str, int]) -> PrunePlan:
        """The plan keeping ``counts[id]`` best channels of each channel group named (heads stay whole).

        Used by planners that choose every group's width themselves (e.g.
        `spiralkit.latency.planner`); groups not in ``counts`` are kept whole.
        """
        removed = [b.module for b in self.blocks]
        plans = [_group_plan(g, self.keep(g, counts[g.id]), removed)
                 for g in self.channels if counts.get(g.id, g.size) < g.size]
        return PrunePlan(groups=tuple(p for p in plans if p is not None), blocks=self.blocks, skipped=self.skipped)


def planner(
    model: nn.Module,
    config: StructuredPrune,
    *,
    example: Example,
    batches: Iterable[tuple[Any, Tensor]] = (),
    loss_fn: LossFn | None = None,
) -> Planner:
    """Trace and score ``model`` once; the returned `Planner` makes a plan for any ratio.

    Arguments and errors are those of `plan_pruning` (``config.ratio`` is not used).
    """
    graph = trace_groups(model, example, heads=config.heads)
    blocks = find_blocks(model, [example], call=call_model) if config.depth else ()
    selected = _select(_candidate_names(model, graph, [b.module for b in blocks]), config.include, config.exclude)
    chosen_blocks = _choose_blocks(model, blocks, config.depth, selected)
    channels = [g for g in graph.channels if all(p in selected for p in _producers(model, g))]
    heads = [h for h in graph.heads if h.module in selected]
    skipped = [SkippedPlan(name=s.name, reason=s.reason) for s in graph.skipped]
    scores = score_structures(
        config.criterion,
        model=model,
        groups=ModelGroups(channels=tuple(channels), heads=tuple(heads)),
        inputs=[example],
        batches=batches,
        loss_fn=loss_fn,
    )
    channels, heads = _drop_unscored(channels, heads, scores, skipped)
    detach_cached(model)  # blocks and some criteria ran it with gradients
    return Planner(config=config, channels=tuple(channels), heads=tuple(heads), scores=scores,
                   blocks=chosen_blocks, skipped=tuple(skipped))


def plan_pruning(
    model: nn.Module,
    config: StructuredPrune,
    *,
    example: Example,
    batches: Iterable[tuple[Any, Tensor]] = (),
    loss_fn: LossFn | None = None,
) -> PrunePlan:
    """Decide which channels, heads and blocks of ``model`` to remove (the model is not changed).

    Args:
        model: The model to prune.
        config: What to prune and how far.
        example: An input batch for tracing (a tensor, a tuple of positional inputs or a
            dict of keyword inputs); activation criteria also measure on it.
        batches: ``(inputs, targets)`` batches for data-driven criteria (taylor needs them;
            activation criteria use them in addition to the example).
        loss_fn: ``loss_fn(outputs, targets)``, for taylor.

    Returns:
        The plan; `PrunePlan.skipped` lists what is left unpruned and why.

    Raises:
        PruneError: A name pattern matches nothing, the criterion lacks data, or ``depth``
            exceeds the removable blocks.
    """
    if config.ratio == 0:
        # Nothing to score: trace only, so that what would be skipped is still reported.
        config = config.model_copy(update={"criterion": Magnitude(norm=2)})
    return planner(model, config, example=example, batches=batches, loss_fn=loss_fn)(config.ratio)


def _drop_unscored(
    channels: list[ChannelGroup], heads: list[HeadGroup], scores: StructureScores, skipped: list[SkippedPlan]
) -> tuple[list[ChannelGroup], list[HeadGroup]]:
    skipped.extend(SkippedPlan(name=name, reason=reason) for name, reason in scores.unscored.items())
    return [g for g in channels if g.id in scores.channels], [h for h in heads if h.module in scores.heads]


def _plan_groups(
    channels: Sequence[ChannelGroup], scores: StructureScores, config: StructuredPrune, removed_blocks: Sequence[str]
) -> tuple[GroupPlan, ...]:
    counts = _kept_counts([_Width(g.id, g.size, _multiple(g, config.round_to)) for g in channels], scores.channels, config)
    plans = []
    for group in channels:
        if counts[group.id] >= group.size:
            continue
        plan = _group_plan(group, _keep(scores.channels[group.id], counts[group.id], group.blocks), removed_blocks)
        if plan is not None:
            plans.append(plan)
    return tuple(plans)


def _plan_heads(
    heads: Sequence[HeadGroup], scores: StructureScores, config: StructuredPrune, removed_blocks: Sequence[str]
) -> tuple[HeadPlan, ...]:
    counts = _kept_counts([_Width(h.module, h.num_heads, 1) for h in heads], scores.heads, config)
    return tuple(
        HeadPlan(module=h.module, kind=h.kind, num_heads=h.num_heads, head_dim=h.head_dim,
                 keep=_keep(scores.heads[h.module], counts[h.module], ()))
        for h in heads
        if counts[h.module] < h.num_heads and not _inside(h.module, removed_blocks)
    )


def prune_structured(
    model: nn.Module,
    config: StructuredPrune,
    *,
    example: Example,
    batches: Iterable[tuple[Any, Tensor]] = (),
    loss_fn: LossFn | None = None,
    mode: Mode = "remove",
) -> PrunePlan:
    """`plan_pruning` then `apply_plan` in one call; returns the plan."""
    plan = plan_pruning(model, config, example=example, batches=batches, loss_fn=loss_fn)
    apply_plan(model, plan, mode=mode)
    return plan
