"""How parameter entries and activations add up to channel and head scores: what structured criteria share.

A channel group's channels are computed by some parameter entries (filters, rows, gate rows)
and read by others; `member_entries` finds, for each member of a group, the entries of each
of its channels. The functions here turn them into `StructureScores`; the criteria of
`spiralkit.prune.importance` and `spiralkit.prune.structured_importance` call them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from spiralkit.errors import PruneError
from spiralkit.graph.attention import HeadGroup, head_slices
from spiralkit.graph.groups import RNN_TYPES, ChannelGroup, Member, ModelGroups, call_model
from spiralkit.graph.layers import CHANNEL_MAPS, is_conv1d
from spiralkit.modules import eval_mode

__all__ = [
    "Batch",
    "StructureScores",
    "activation_scores",
    "head_values",
    "member_entries",
    "norm_scores",
    "per_root",
    "power_sum",
    "producer_entries",
    "random_structure_scores",
    "taylor_structure_scores",
]

Batch = Any
LossFn = Callable[[Tensor, Tensor], Tensor]


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


@dataclass(frozen=True)
class Entries:
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


def power_sum(values: Tensor, power: int) -> Tensor:
    """``Σ |v|^p`` per row (summed in the weights' precision, returned as float64)."""
    magnitude = values.abs()
    return (magnitude if power == 1 else magnitude.square() if power == 2 else magnitude.pow(power)).sum(1).double()


def member_entries(model: nn.Module, member: Member) -> list[Entries]:
    """Every parameter entry of ``member``'s channels, by kind."""
    module = model.get_submodule(member.module)
    local = torch.as_tensor(member.local, dtype=torch.long)
    entries: list[Entries] = []

    def add(name: str, kind: Any, values: Callable[[Tensor], Tensor]) -> None:
        param = getattr(module, name, None)
        if isinstance(param, nn.Parameter):
            entries.append(Entries(param, kind, values))

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
    elif is_conv1d(module):  # Hugging Face Conv1D: weight (in, out)
        if member.role == "out":
            add("weight", "weight", _rows(1, local))
            add("bias", "bias", _rows(0, local))
        else:
            add("weight", "input", _rows(0, local))
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


def _rnn_entries(module: nn.RNNBase, member: Member, local: Tensor) -> list[Entries]:
    gates = 4 if isinstance(module, nn.LSTM) else 3 if isinstance(module, nn.GRU) else 1
    hidden = module.hidden_size
    suffixes = ("", "_reverse") if module.bidirectional else ("",)
    entries: list[Entries] = []
    if member.role == "in":
        for suffix in suffixes:
            entries.append(Entries(getattr(module, f"weight_ih_l0{suffix}"), "input", _rows(1, local)))
        return entries

    def gate_rows(t: Tensor) -> Tensor:
        return torch.cat([t.index_select(0, local + g * hidden).reshape(len(local), -1) for g in range(gates)], dim=1)

    for layer in range(module.num_layers):
        for suffix in suffixes:
            entries.append(Entries(getattr(module, f"weight_ih_l{layer}{suffix}"), "weight", gate_rows))
            entries.append(Entries(getattr(module, f"weight_hh_l{layer}{suffix}"), "weight", gate_rows))
            entries.append(Entries(getattr(module, f"weight_hh_l{layer}{suffix}"), "input", _rows(1, local)))
            if module.bias:
                entries.append(Entries(getattr(module, f"bias_ih_l{layer}{suffix}"), "bias", gate_rows))
                entries.append(Entries(getattr(module, f"bias_hh_l{layer}{suffix}"), "bias", gate_rows))
    return entries


def per_root(group: ChannelGroup, member: Member, per_local: Tensor, total: Tensor) -> None:
    """Add each local channel's value into its root channel's slot of ``total``."""
    total.index_add_(0, torch.as_tensor(member.roots, dtype=torch.long), per_local.to(total.dtype))


def producer_entries(model: nn.Module, group: ChannelGroup) -> list[tuple[Member, Entries]]:
    """The weights that compute ``group``'s channels: filters, rows and gate rows of its producers."""
    return [(m, e) for m in group.members for e in member_entries(model, m) if m.role == "out" and e.kind == "weight"]


def norm_scores(model: nn.Module, groups: ModelGroups, power: int) -> StructureScores:
    """``(Σ |w|^p)^(1/p)`` over the weights computing each channel, and each head's weights (Li et al. 2017)."""
    channels = {}
    for group in groups.channels:
        total = torch.zeros(group.size, dtype=torch.float64)
        for member, entry in producer_entries(model, group):
            per_root(group, member, power_sum(entry.values(entry.param.detach()), power), total)
        channels[group.id] = total.pow(1.0 / power)
    heads = {}
    for head in groups.heads:
        total = torch.zeros(head.num_heads, dtype=torch.float64)
        for param, piece in head_slices(model, head):
            if piece.weight:
                total += power_sum(head_values(param.detach(), piece, head), power)
        heads[head.module] = total.pow(1.0 / power)
    return StructureScores(channels=channels, heads=heads)


def head_values(tensor: Tensor, piece: Any, head: HeadGroup) -> Tensor:
    """``(num_heads, n)``: each head's entries of one parameter."""
    return torch.stack([tensor.index_select(piece.dim, piece.index[:, h, :].flatten()).reshape(-1)
                        for h in range(head.num_heads)])


def random_structure_scores(groups: ModelGroups, *, seed: int) -> StructureScores:
    """Uniform random scores for every channel and head (deterministic for a seed): the control."""
    generator = torch.Generator().manual_seed(seed)
    channels = {g.id: torch.rand(g.size, generator=generator, dtype=torch.float64) for g in groups.channels}
    heads = {h.module: torch.rand(h.num_heads, generator=generator, dtype=torch.float64) for h in groups.heads}
    return StructureScores(channels=channels, heads=heads)


def taylor_structure_scores(
    model: nn.Module, groups: ModelGroups, batches: Iterable[tuple[Batch, Tensor]], *, loss_fn: LossFn | None
) -> StructureScores:
    """``|Σ_s w_s · Σ_b ∂L_b/∂w_s|`` over every parameter entry of each channel and head (Molchanov et al. 2019).

    Args:
        model: The model the groups were traced from; its parameters' gradients are cleared.
        groups: The traced groups.
        batches: ``(inputs, targets)`` batches; all of them are used.
        loss_fn: ``loss_fn(outputs, targets)``.

    Raises:
        PruneError: No loss function, or no batch.
    """
    if loss_fn is None:
        raise PruneError("taylor importance needs a loss function (loss_fn)")
    params = [p for p in model.parameters() if p.requires_grad]
    grads = {id(p): torch.zeros_like(p) for p in params}
    seen = 0
    for x, y in batches:
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
            for entry in member_entries(model, member):
                grad = grads.get(id(entry.param))
                if grad is not None:
                    product = entry.values(entry.param.detach() * grad).double().sum(1)
                    per_root(group, member, product, total)
        channels[group.id] = total.abs()
    heads = {}
    for head in groups.heads:
        total = torch.zeros(head.num_heads, dtype=torch.float64)
        for param, piece in head_slices(model, head):
            grad = grads.get(id(param))
            if grad is not None:
                total += head_values(param.detach() * grad, piece, head).double().sum(1)
        heads[head.module] = total.abs()
    return StructureScores(channels=channels, heads=heads)


def activation_scores(
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
        axis = 1 if isinstance(module, (nn.modules.conv._ConvNd, *CHANNEL_MAPS)) else x.dim() - 1
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
            per_root(group, member, per_local, total)
            per_root(group, member, torch.ones_like(per_local), weight)
        if weight.sum() == 0:
            unscored[group.id] = f"criterion {name}: no layer reads the group's channels"
        else:
            channels[group.id] = total / weight.clamp_min(1)
    unscored.update({h.module: f"criterion {name} cannot score attention heads" for h in groups.heads})
    return StructureScores(channels=channels, heads={}, unscored=unscored)

