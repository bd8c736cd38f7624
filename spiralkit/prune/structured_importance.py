"""Importance of channels and attention heads for structured pruning: low is removed first.

Criteria are typed configs, each one class whose `structure_scores` method scores channels
and heads, like the weight criteria of `spiralkit.prune.importance` (whose `Magnitude`,
`Random` and `Taylor` are reused). `CHANNEL_CRITERIA` is the table a recipe's structured
``criterion`` is typed from; `score_structures` calls the criterion's method:

* `Magnitude` — ``(Σ |w|^p)^(1/p)`` over the weights that *compute* the channel: the filters
  of every convolution, the rows of every linear layer and the gate rows of every RNN in the
  group (Li et al. 2017, "Pruning Filters for Efficient ConvNets"; p = 1 or 2). For a head:
  its rows of the q, k, v projections and its columns of the output projection.
* `Taylor` — ``|Σ_s w_s · Σ_b ∂L_b/∂w_s|`` over *every* parameter entry that removing the
  channel (or head) deletes — filters, biases, norm scales and shifts, and the inputs that
  read it — with the gradient summed over a few batches: the first-order estimate of the loss
  change when the channel is zeroed (Molchanov et al. 2019, "Importance Estimation for
  Neural Network Pruning").
* `MeanActivation` — mean ``|a|`` of the channel as seen by the layers that read it
  (forward pre-hooks over a few batches; Polyak & Wolf 2015).
* `APoZ` — ``1 − APoZ``, where APoZ is the fraction of exact zeros in the channel as seen by
  its readers, i.e. after the ReLU (Hu et al. 2016, "Network Trimming").
* `BNScale` — ``|γ|`` of the channel's batch norm (Liu et al. 2017, "Learning Efficient
  Convolutional Networks through Network Slimming"); `bn_l1_penalty` is the sparsity term
  to add to the loss during recovery.
* `NormRatio` — ``‖W‖₂² / ‖W‖₁`` over the same weights as `Magnitude`: large for channels
  whose weight is concentrated in a few large entries.
* `Random` — uniform scores, the control.

Activation criteria cannot score attention heads; such heads are returned unscored (with the
reason) and left unpruned.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import islice
from typing import Annotated, Literal, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from spiralkit.configs import KindTable, by_kind
from spiralkit.errors import PruneError
from spiralkit.graph.attention import head_slices
from spiralkit.graph.groups import ModelGroups
from spiralkit.prune.channel_scoring import (
    Batch,
    StructureScores,
    activation_scores,
    head_values,
    member_entries,
    per_root,
    power_sum,
    producer_entries,
)
from spiralkit.prune.importance import LossFn, Magnitude, Random, Taylor

__all__ = [
    "APoZ",
    "BNScale",
    "CHANNEL_CRITERIA",
    "ChannelCriterion",
    "MeanActivation",
    "NormRatio",
    "StructureCriterion",
    "StructureScores",
    "bn_l1_penalty",
    "score_structures",
]


@runtime_checkable
class StructureCriterion(Protocol):
    """A criterion that scores channels and heads: a config with a ``kind`` and `structure_scores`."""

    kind: str

    def structure_scores(
        self,
        *,
        model: nn.Module,
        groups: ModelGroups,
        inputs: Sequence[Batch],
        batches: Iterable[tuple[Batch, Tensor]],
        loss_fn: LossFn | None,
    ) -> StructureScores:
        """Scores of every channel group and attention head (see `score_structures`)."""
        ...


class _ActivationCriterion(BaseModel):
    """A criterion averaging a statistic of each channel's activations as its readers see them."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str
    batches: int = Field(default=8, gt=0)

    def structure_scores(self, *, model: nn.Module, groups: ModelGroups, inputs: Sequence[Batch],
                         batches: Iterable[tuple[Batch, Tensor]], loss_fn: LossFn | None) -> StructureScores:
        """`activation_scores` of `statistic` over ``inputs`` and the first ``self.batches`` batches' inputs."""
        data = list(inputs) + [x for x, _ in islice(batches, self.batches)]
        return activation_scores(model, groups, data, self.statistic, self.kind)

    @staticmethod
    def statistic(rows: Tensor) -> Tensor:
        """One value per row of ``(channels, n)`` activations."""
        raise NotImplementedError


class MeanActivation(_ActivationCriterion):
    """Mean absolute activation of each channel over ``batches`` batches (Polyak & Wolf 2015)."""

    kind: Literal["mean_activation"] = "mean_activation"

    @staticmethod
    def statistic(rows: Tensor) -> Tensor:
        """``mean |a|`` per channel."""
        return rows.abs().mean(1)


class APoZ(_ActivationCriterion):
    """``1 − APoZ``: one minus the average percentage of zeros of each channel (Hu et al. 2016)."""

    kind: Literal["apoz"] = "apoz"

    @staticmethod
    def statistic(rows: Tensor) -> Tensor:
        """The fraction of non-zero activations per channel."""
        return 1.0 - (rows == 0).double().mean(1)


class BNScale(BaseModel):
    """``|γ|`` of the channel's batch norm: network slimming (Liu et al. 2017)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["bn_scale"] = "bn_scale"

    def structure_scores(self, *, model: nn.Module, groups: ModelGroups, inputs: Sequence[Batch],
                         batches: Iterable[tuple[Batch, Tensor]], loss_fn: LossFn | None) -> StructureScores:
        """``Σ |γ|`` over the group's batch norms, per root channel; heads and groups without one are unscored."""
        channels, unscored = {}, {}
        for group in groups.channels:
            total = torch.zeros(group.size, dtype=torch.float64)
            found = False
            for member in group.members:
                if isinstance(model.get_submodule(member.module), nn.modules.batchnorm._BatchNorm):
                    for entry in member_entries(model, member):
                        if entry.kind == "norm":
                            found = True
                            per_root(group, member, entry.values(entry.param.detach()).abs().double().sum(1), total)
            if found:
                channels[group.id] = total
            else:
                unscored[group.id] = "criterion bn_scale: the group has no batch norm with a scale"
        unscored.update({h.module: "criterion bn_scale cannot score attention heads" for h in groups.heads})
        if not channels and not groups.heads and groups.channels:
            raise PruneError("criterion bn_scale needs batch norms with a learnable scale; "
                             "the model has none in any prunable group")
        return StructureScores(channels=channels, heads={}, unscored=unscored)


class NormRatio(BaseModel):
    """``‖W‖₂² / ‖W‖₁`` of the weights computing the channel."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["norm_ratio"] = "norm_ratio"

    def structure_scores(self, *, model: nn.Module, groups: ModelGroups, inputs: Sequence[Batch],
                         batches: Iterable[tuple[Batch, Tensor]], loss_fn: LossFn | None) -> StructureScores:
        """``‖W‖₂² / ‖W‖₁`` per channel and head (0 where all its weights are 0)."""
        channels = {}
        for group in groups.channels:
            squares = torch.zeros(group.size, dtype=torch.float64)
            absolute = torch.zeros(group.size, dtype=torch.float64)
            for member, entry in producer_entries(model, group):
                values = entry.values(entry.param.detach())
                per_root(group, member, power_sum(values, 2), squares)
                per_root(group, member, power_sum(values, 1), absolute)
            channels[group.id] = _ratio(squares, absolute)
        heads = {}
        for head in groups.heads:
            squares = torch.zeros(head.num_heads, dtype=torch.float64)
            absolute = torch.zeros(head.num_heads, dtype=torch.float64)
            for param, piece in head_slices(model, head):
                if piece.weight:
                    values = head_values(param.detach(), piece, head)
                    squares += power_sum(values, 2)
                    absolute += power_sum(values, 1)
            heads[head.module] = _ratio(squares, absolute)
        return StructureScores(channels=channels, heads=heads)


def _ratio(squares: Tensor, absolute: Tensor) -> Tensor:
    return torch.where(absolute > 0, squares / absolute.clamp_min(1e-300), torch.zeros_like(absolute))


CHANNEL_CRITERIA: dict[str, type[BaseModel]] = by_kind(
    Magnitude,
    Taylor,
    MeanActivation,
    APoZ,
    BNScale,
    NormRatio,
    Random,
)
"""The criteria of structured pruning, by ``kind``: a new one is a class with `structure_scores` and a line here."""

ChannelCriterion = Annotated[StructureCriterion, KindTable(CHANNEL_CRITERIA, what="structured pruning criterion")]
"""A recipe field holding one of the `CHANNEL_CRITERIA`, chosen by its ``kind`` (or named alone)."""


def score_structures(
    criterion: object,
    *,
    model: nn.Module,
    groups: ModelGroups,
    inputs: Sequence[Batch] = (),
    batches: Iterable[tuple[Batch, Tensor]] = (),
    loss_fn: LossFn | None = None,
) -> StructureScores:
    """Score every channel group and attention head of ``groups`` with ``criterion``.

    Args:
        criterion: The criterion config; its `StructureCriterion.structure_scores` scores.
        model: The model the groups were traced from.
        groups: The traced groups.
        inputs: Input batches for activation criteria (e.g. the example).
        batches: ``(inputs, targets)`` batches for data-driven criteria.
        loss_fn: ``loss_fn(outputs, targets)``, for `Taylor`.

    Returns:
        Scores per root channel and per head; higher means keep.

    Raises:
        PruneError: The criterion is unknown, or needs data or a loss it was not given.
    """
    if not isinstance(criterion, StructureCriterion):
        raise PruneError(f"unknown structured pruning criterion {type(criterion).__name__}")
    return criterion.structure_scores(model=model, groups=groups, inputs=inputs, batches=batches, loss_fn=loss_fn)


def bn_l1_penalty(model: nn.Module, strength: float) -> Tensor:
    """The network-slimming sparsity term ``strength · Σ |γ|`` over every batch norm's scale.

    Add it to the training loss during recovery so that unimportant channels' scales shrink
    towards zero before the next `BNScale` pruning round (Liu et al. 2017, eq. 1).

    Args:
        model: The model; every ``_BatchNorm`` with a learnable scale counts.
        strength: ``λ``, at least 0.

    Returns:
        A scalar tensor with gradient (zero if the model has no batch norm).

    Raises:
        PruneError: ``strength`` is negative.
    """
    if strength < 0:
        raise PruneError(f"bn_l1_penalty strength must be >= 0, got {strength}")
    scales = [m.weight for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
    if not scales:
        return torch.zeros(())
    return strength * torch.stack([s.abs().sum() for s in scales]).sum()
