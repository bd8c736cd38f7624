"""Importance of channels and attention heads for structured pruning: low is removed first.

Criteria are typed configs dispatched by type (`score_structures`), like the weight criteria
of `spiralkit.prune.importance` (whose `Magnitude`, `Random` and `Taylor` are reused):

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

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import singledispatch
from itertools import islice
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from torch import Tensor, nn

from spiralkit.configs import kind_from_string
from spiralkit.errors import PruneError
from spiralkit.graph.attention import HeadGroup, head_slices
from spiralkit.graph.groups import (
    RNN_TYPES,
    ChannelGroup,
    Member,
    ModelGroups,
    call_model,
)
from spiralkit.modules import eval_mode
from spiralkit.prune.importance import LossFn, Magnitude, Random, Taylor

__all__ = [
    "APoZ",
    "BNScale",
    "ChannelCriterion",
    "MeanActivation",
    "NormRatio",
    "StructureScores",
    "bn_l1_penalty",
    "score_structures",
]

Batch = Any


class MeanActivation(BaseModel):
    """Mean absolute activation of each channel over ``batches`` batches (Polyak & Wolf 2015)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["mean_activation"] = "mean_activation"
    batches: int = Field(default=8, gt=0)


class APoZ(BaseModel):
    """``1 − APoZ``: one minus the average percentage of zeros of each channel (Hu et al. 2016)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["apoz"] = "apoz"
    batches: int = Field(default=8, gt=0)


class BNScale(BaseModel):
    """``|γ|`` of the channel's batch norm: network slimming (Liu et al. 2017)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["bn_scale"] = "bn_scale"


class NormRatio(BaseModel):
    """``‖W‖₂² / ‖W‖₁`` of the weights computing the channel."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["norm_ratio"] = "norm_ratio"


ChannelCriterion = Annotated[
    Magnitude | Taylor | MeanActivation | APoZ | BNScale | NormRatio | Random,
    Field(discriminator="kind"),
    BeforeValidator(kind_from_string),
]


@dataclass(frozen=True)
class StructureScores:
    """Scores of channel groups and attention heads (higher = more important).

    Attributes:
        channels: Group id → one score per root channel.
        heads: Attention module → one score per head.
        unscored: Group id or attention module → why the criterion cannot score it.
    """

    channels: dict[str, Tensor]
    heads: dict[str, Tensor]
    unscored: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- parameter entries


@dataclass(frozen=True)
class _Entries:
    """The entries of one parameter that belong to each of a member's local channels.

    ``values(t)`` maps a tensor shaped like the parameter to a ``(len(locals), n)`` matrix,
    row ``i`` holding the entries of local channel ``locals[i]``.
    """

    param: nn.Parameter
    kind: Literal["weight", "bias", "norm", "input"]
    values: Callable[[Tensor], Tensor]


def _rows(dim: int, index: Tensor) -> Callable[[Tensor], Tensor]:
    def pick(t: Tensor) -> Tensor:
        whole = len(index) == t.shape[dim] and bool((index == torch.arange(len(index))).all())
        picked = t if whole else t.index_select(dim, index)  # no copy when all channels are taken
        return picked.movedim(dim, 0).reshape(len(index), -1)

    return pick


def _power_sum(values: Tensor, power: int) -> Tensor:
    """``Σ |v|^p`` per row (summed in the weights' precision, returned as float64)."""
    magnitude = values.abs()
    return (magnitude if power == 1 else magnitude.square() if power == 2 else magnitude.pow(power)).sum(1).double()


def _member_entries(model: nn.Module, member: Member) -> list[_Entries]:
    """Every parameter entry of ``member``'s channels, by kind."""
    module = model.get_submodule(member.module)
    local = torch.as_tensor(member.local, dtype=torch.long)
    entries: list[_Entries] = []

    def add(name: str, kind: Any, values: Callable[[Tensor], Tensor]) -> None:
        param = getattr(module, name, None)
        if isinstance(param, nn.Parameter):
            entries.append(_Entries(param, kind, values))

    if isinstance(module, nn.modules.conv._ConvNd):
        out_dim, in_dim = (1, 0) if module.transposed else (0, 1)
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        if member.role == "out":
            add("weight", "weight", _rows(out_dim, local))
            add("bias", "bias", _rows(0, local))
        elif module.groups == 1 or depthwise:
            add("weight", "input", _rows(in_dim, local))
        else:
            add("weight", "input", _grouped_inputs(module, local))
    elif isinstance(module, nn.Linear):
        if member.role == "out":
            add("weight", "weight", _rows(0, local))
            add("bias", "bias", _rows(0, local))
        else:
            add("weight", "input", _rows(1, local))
    elif isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        add("weight", "norm", _rows(0, local))
        add("bias", "bias", _rows(0, local))
    elif isinstance(module, nn.PReLU):
        add("weight", "bias", _rows(0, local))
    elif isinstance(module, nn.Embedding):
        add("weight", "weight", _rows(1, local))
    elif isinstance(module, RNN_TYPES):
        entries.extend(_rnn_entries(module, member, local))
    return entries


def _grouped_inputs(module: nn.modules.conv._ConvNd, local: Tensor) -> Callable[[Tensor], Tensor]:
    per_group = module.in_channels // module.groups
    rows = module.out_channels // module.groups

    def pick(t: Tensor) -> Tensor:
        group, offset = local // per_group, local % per_group
        return torch.stack([t[g * rows : (g + 1) * rows, o].reshape(-1) for g, o in zip(group.tolist(), offset.tolist())])

    return pick


def _rnn_entries(module: nn.RNNBase, member: Member, local: Tensor) -> list[_Entries]:
    gates = 4 if isinstance(module, nn.LSTM) else 3 if isinstance(module, nn.GRU) else 1
    hidden = module.hidden_size
    suffixes = ("", "_reverse") if module.bidirectional else ("",)
    entries: list[_Entries] = []
    if member.role == "in":
        for suffix in suffixes:
            entries.append(_Entries(getattr(module, f"weight_ih_l0{suffix}"), "input", _rows(1, local)))
        return entries

    def gate_rows(t: Tensor) -> Tensor:
        return torch.cat([t.index_select(0, local + g * hidden).reshape(len(local), -1) for g in range(gates)], dim=1)

    for layer in range(module.num_layers):
        for suffix in suffixes:
            entries.append(_Entries(getattr(module, f"weight_ih_l{layer}{suffix}"), "weight", gate_rows))
            entries.append(_Entries(getattr(module, f"weight_hh_l{layer}{suffix}"), "weight", gate_rows))
            entries.append(_Entries(getattr(module, f"weight_hh_l{layer}{suffix}"), "input", _rows(1, local)))
            if module.bias:
                entries.append(_Entries(getattr(module, f"bias_ih_l{layer}{suffix}"), "bias", gate_rows))
                entries.append(_Entries(getattr(module, f"bias_hh_l{layer}{suffix}"), "bias", gate_rows))
    return entries


def _per_root(group: ChannelGroup, member: Member, per_local: Tensor, total: Tensor) -> None:
    """Add each local channel's value into its root channel's slot of ``total``."""
    total.index_add_(0, torch.as_tensor(member.roots, dtype=torch.long), per_local.to(total.dtype))


def _producer_entries(model: nn.Module, group: ChannelGroup) -> list[tuple[Member, _Entries]]:
    return [(m, e) for m in group.members for e in _member_entries(model, m) if m.role == "out" and e.kind == "weight"]


# --------------------------------------------------------------------------- criteria


@singledispatch
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
        criterion: The criterion config; its type selects the method.
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
    raise PruneError(f"unknown structured pruning criterion {type(criterion).__name__}")


def _norm_scores(model: nn.Module, groups: ModelGroups, power: int) -> StructureScores:
    channels = {}
    for group in groups.channels:
        total = torch.zeros(group.size, dtype=torch.float64)
        for member, entry in _producer_entries(model, group):
            _per_root(group, member, _power_sum(entry.values(entry.param.detach()), power), total)
        channels[group.id] = total.pow(1.0 / power)
    heads = {}
    for head in groups.heads:
        total = torch.zeros(head.num_heads, dtype=torch.float64)
        for param, piece in head_slices(model, head):
            if piece.weight:
                total += _power_sum(_head_values(param.detach(), piece, head), power)
        heads[head.module] = total.pow(1.0 / power)
    return StructureScores(channels=channels, heads=heads)


def _head_values(tensor: Tensor, piece: Any, head: HeadGroup) -> Tensor:
    """``(num_heads, n)``: each head's entries of one parameter."""
    return torch.stack([tensor.index_select(piece.dim, piece.index[:, h, :].flatten()).reshape(-1)
                        for h in range(head.num_heads)])


@score_structures.register
def _(criterion: Magnitude, *, model, groups, inputs=(), batches=(), loss_fn=None) -> StructureScores:  # type: ignore[no-untyped-def]
    return _norm_scores(model, groups, criterion.norm)


@score_structures.register
def _(criterion: NormRatio, *, model, groups, inputs=(), batches=(), loss_fn=None) -> StructureScores:  # type: ignore[no-untyped-def]
    channels = {}
    for group in groups.channels:
        squares = torch.zeros(group.size, dtype=torch.float64)
        absolute = torch.zeros(group.size, dtype=torch.float64)
        for member, entry in _producer_entries(model, group):
            values = entry.values(entry.param.detach())
            _per_root(group, member, _power_sum(values, 2), squares)
            _per_root(group, member, _power_sum(values, 1), absolute)
        channels[group.id] = torch.where(absolute > 0, squares / absolute.clamp_min(1e-300), torch.zeros_like(absolute))
    heads = {}
    for head in groups.heads:
        squares = torch.zeros(head.num_heads, dtype=torch.float64)
        absolute = torch.zeros(head.num_heads, dtype=torch.float64)
        for param, piece in head_slices(model, head):
            if piece.weight:
                values = _head_values(param.detach(), piece, head)
                squares += _power_sum(values, 2)
                absolute += _power_sum(values, 1)
        heads[head.module] = torch.where(absolute > 0, squares / absolute.clamp_min(1e-300), torch.zeros_like(absolute))
    return StructureScores(channels=channels, heads=heads)


@score_structures.register
def _(criterion: Random, *, model, groups, inputs=(), batches=(), loss_fn=None) -> StructureScores:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(criterion.seed)
    channels = {g.id: torch.rand(g.size, generator=generator, dtype=torch.float64) for g in groups.channels}
    heads = {h.module: torch.rand(h.num_heads, generator=generator, dtype=torch.float64) for h in groups.heads}
    return StructureScores(channels=channels, heads=heads)


@score_structures.register
def _(criterion: BNScale, *, model, groups, inputs=(), batches=(), loss_fn=None) -> StructureScores:  # type: ignore[no-untyped-def]
    channels, unscored = {}, {}
    for group in groups.channels:
        total = torch.zeros(group.size, dtype=torch.float64)
        found = False
        for member in group.members:
            if isinstance(model.get_submodule(member.module), nn.modules.batchnorm._BatchNorm):
                for entry in _member_entries(model, member):
                    if entry.kind == "norm":
                        found = True
                        _per_root(group, member, entry.values(entry.param.detach()).abs().double().sum(1), total)
        if found:
            channels[group.id] = total
        else:
            unscored[group.id] = "criterion bn_scale: the group has no batch norm with a scale"
    unscored.update({h.module: "criterion bn_scale cannot score attention heads" for h in groups.heads})
    if not channels and not groups.heads and groups.channels:
        raise PruneError("criterion bn_scale needs batch norms with a learnable scale; the model has none in any prunable group")
    return StructureScores(channels=channels, heads={}, unscored=unscored)


@score_structures.register
def _(criterion: Taylor, *, model, groups, inputs=(), batches=(), loss_fn=None) -> StructureScores:  # type: ignore[no-untyped-def]
    if loss_fn is None:
        raise PruneError("taylor importance needs a loss function (loss_fn)")
    params = [p for p in model.parameters() if p.requires_grad]
    grads = {id(p): torch.zeros_like(p) for p in params}
    seen = 0
    for x, y in islice(batches, criterion.batches):
        model.zero_grad(set_to_none=True)
        loss_fn(call_model(model, x), y).backward()
        for p in params:
            if p.grad is not None:
                grads[id(p)] += p.grad
        seen += 1
    model.zero_grad(set_to_none=True)
    if seen == 0:
        raise PruneError("taylor importance needs at least one (inputs, targets) batch; none was given")
    channels = {}
    for group in groups.channels:
        total = torch.zeros(group.size, dtype=torch.float64)
        for member in group.members:
            for entry in _member_entries(model, member):
                grad = grads.get(id(entry.param))
                if grad is not None:
                    product = entry.values(entry.param.detach() * grad).double().sum(1)
                    _per_root(group, member, product, total)
        channels[group.id] = total.abs()
    heads = {}
    for head in groups.heads:
        total = torch.zeros(head.num_heads, dtype=torch.float64)
        for param, piece in head_slices(model, head):
            grad = grads.get(id(param))
            if grad is not None:
                total += _head_values(param.detach() * grad, piece, head).double().sum(1)
        heads[head.module] = total.abs()
    return StructureScores(channels=channels, heads=heads)


def _activation_scores(
    model: nn.Module, groups: ModelGroups, inputs: Sequence[Batch], stat: Callable[[Tensor], Tensor], name: str
) -> StructureScores:
    """Average ``stat`` (per channel of a reader's input) over the inputs, per root channel."""
    readers: dict[str, list[tuple[ChannelGroup, Member]]] = defaultdict(list)
    for group in groups.channels:
        for member in group.consumers():
            readers[member.module].append((group, member))
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = defaultdict(int)

    def hook(module: nn.Module, args: Any, name: str) -> None:
        x = args[0].detach()
        axis = 1 if isinstance(module, nn.modules.conv._ConvNd) else x.dim() - 1
        per_channel = stat(x.movedim(axis, 0).reshape(x.shape[axis], -1)).double()
        sums[name] = sums.get(name, torch.zeros_like(per_channel)) + per_channel
        counts[name] += 1

    handles = [
        model.get_submodule(module).register_forward_pre_hook(lambda m, a, n=module: hook(m, a, n))
        for module in readers
    ]
    try:
        with eval_mode(model), torch.no_grad():
            for batch in inputs:
                call_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    if not inputs:
        raise PruneError(f"criterion {name} needs input batches (the example at least)")
    channels, unscored = {}, {}
    for group in groups.channels:
        total = torch.zeros(group.size, dtype=torch.float64)
        weight = torch.zeros(group.size, dtype=torch.float64)
        for member in group.consumers():
            if member.module not in sums:
                continue
            per_local = (sums[member.module] / counts[member.module]).index_select(
                0, torch.as_tensor(member.local, dtype=torch.long))
            _per_root(group, member, per_local, total)
            _per_root(group, member, torch.ones_like(per_local), weight)
        if weight.sum() == 0:
            unscored[group.id] = f"criterion {name}: no layer reads the group's channels"
        else:
            channels[group.id] = total / weight.clamp_min(1)
    unscored.update({h.module: f"criterion {name} cannot score attention heads" for h in groups.heads})
    return StructureScores(channels=channels, heads={}, unscored=unscored)


@score_structures.register
def _(criterion: MeanActivation, *, model, groups, inputs=(), batches=(), loss_fn=None) -> StructureScores:  # type: ignore[no-untyped-def]
    data = list(inputs) + [x for x, _ in islice(batches, criterion.batches)]
    return _activation_scores(model, groups, data, lambda rows: rows.abs().mean(1), "mean_activation")


@score_structures.register
def _(criterion: APoZ, *, model, groups, inputs=(), batches=(), loss_fn=None) -> StructureScores:  # type: ignore[no-untyped-def]
    data = list(inputs) + [x for x, _ in islice(batches, criterion.batches)]
    return _activation_scores(model, groups, data, lambda rows: 1.0 - (rows == 0).double().mean(1), "apoz")


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
