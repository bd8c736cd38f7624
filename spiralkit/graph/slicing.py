"""Per-layer-type slicers: remove channels from a layer, or zero them in place.

`edit_layer` is dispatched on the layer's type. Both modes act on exactly the same entries —
``"remove"`` deletes them (rebuilding the parameters and patching ``in_channels`` and the
like), ``"mask"`` sets them to zero with the shapes unchanged — so that a masked model and
its physically pruned twin compute the same function: a removed output channel is zero in
the masked model everywhere downstream (its filter, bias and batch-norm scale and shift are
zero), and the inputs that read it are zero too.

Parameters shared between layers (tied weights) stay shared: a `Cutter` reuses the new
tensor when the same parameter is cut the same way twice.

A channel map (`ChannelPadShortcut`) has no parameters: both modes edit its index. A removed
output is an entry less (masked: -1, so the channel is zero like every other removed one);
a removed input turns the entries that copy it into -1 (zeros) — in the masked model that
input is zero already, so both compute the same function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import singledispatch
from typing import Any, Literal

import torch
from torch import Tensor, nn

from spiralkit.graph.layers import is_conv1d
from spiralkit.models.resnet_cifar import ChannelPadShortcut

__all__ = ["Cutter", "LayerEdit", "Mode", "edit_layer"]

Mode = Literal["mask", "remove"]


@dataclass(frozen=True)
class LayerEdit:
    """The channels one layer keeps.

    Attributes:
        out: Kept output channels (for norms, embeddings and depthwise convolutions: their
            only channel axis), or None to leave them.
        inp: Kept input channels, or None to leave them.
    """

    out: tuple[int, ...] | None = None
    inp: tuple[int, ...] | None = None


@dataclass
class Cutter:
    """Rebuilds parameters with some entries removed, keeping tied parameters tied."""

    mode: Mode
    _cache: dict[tuple[Any, ...], Tensor] = field(default_factory=dict)

    def index(self, owner: nn.Module, name: str, cuts: Sequence[tuple[int, Tensor]]) -> None:
        """Keep only ``index`` along ``dim`` for each ``(dim, index)`` of ``cuts`` (remove mode),
        or zero everything else (mask mode)."""
        old = getattr(owner, name, None)
        if old is None or not cuts:
            return
        if self.mode == "mask":
            with torch.no_grad():
                for dim, keep in cuts:
                    drop = _complement(keep, old.shape[dim])
                    if drop.numel():
                        old.index_fill_(dim, drop, 0.0)
            return
        key = (id(old), tuple((dim, tuple(keep.tolist())) for dim, keep in cuts))
        self._assign(owner, name, old, key, lambda value: _select(value, cuts))

    def gather(self, owner: nn.Module, name: str, dim: int, index: Tensor, tag: tuple[Any, ...]) -> None:
        """Replace ``owner.name`` by ``old.gather(dim, index)`` (remove mode only)."""
        old = getattr(owner, name)
        self._assign(owner, name, old, (id(old), "gather", tag), lambda value: value.gather(dim, index))

    def _assign(self, owner: nn.Module, name: str, old: Tensor, key: tuple[Any, ...], make: Any) -> None:
        new = self._cache.get(key)
        if new is None:
            value = make(old.detach()).clone().contiguous()
            new = nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else value
            self._cache[key] = new
        setattr(owner, name, new)


def _select(value: Tensor, cuts: Sequence[tuple[int, Tensor]]) -> Tensor:
    for dim, keep in cuts:
        value = value.index_select(dim, keep)
    return value


def _complement(keep: Tensor, size: int) -> Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    mask[keep] = False
    return mask.nonzero().flatten()


def _long(values: Sequence[int] | None) -> Tensor | None:
    return None if values is None else torch.as_tensor(list(values), dtype=torch.long)


@singledispatch
def edit_layer(module: nn.Module, edit: LayerEdit, cutter: Cutter) -> None:
    """Remove or zero the channels ``edit`` drops from ``module`` (see the module docstring).

    Raises:
        TypeError: No slicer for the layer type (the graph never hands one over).
    """
    if is_conv1d(module):
        _conv1d(module, edit, cutter)
        return
    raise TypeError(f"spiralkit has no slicer for {type(module).__name__}")


@edit_layer.register
def _conv(module: nn.modules.conv._ConvNd, edit: LayerEdit, cutter: Cutter) -> None:
    out, inp = _long(edit.out), _long(edit.inp)
    depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
    out_dim, in_dim = (1, 0) if module.transposed else (0, 1)
    if depthwise:
        if out is not None:
            cutter.index(module, "weight", [(0, out)])
            cutter.index(module, "bias", [(0, out)])
            if cutter.mode == "remove":
                module.in_channels = module.out_channels = module.groups = len(out)
        return
    cuts = [(out_dim, out)] if out is not None else []
    if inp is not None and module.groups == 1:
        cuts.append((in_dim, inp))
    cutter.index(module, "weight", cuts)
    if out is not None:
        cutter.index(module, "bias", [(0, out)])
    if inp is not None and module.groups > 1:
        _grouped_inputs(module, inp, cutter)
    if cutter.mode == "remove":
        if out is not None:
            module.out_channels = len(out)
        if inp is not None:
            module.in_channels = len(inp)


def _grouped_inputs(module: nn.modules.conv._ConvNd, keep: Tensor, cutter: Cutter) -> None:
    """Input channels of a grouped convolution: each group keeps its own (equally many) inputs."""
    groups = module.groups
    per_group_in = module.in_channels // groups
    rows = module.weight.shape[0] // groups
    kept = [((keep >= g * per_group_in) & (keep < (g + 1) * per_group_in)).nonzero().flatten() for g in range(groups)]
    relative = [keep[k] - g * per_group_in for g, k in enumerate(kept)]
    if len({len(r) for r in relative}) != 1:
        raise ValueError(f"grouped convolution keeps unequal numbers of inputs per group: {[len(r) for r in relative]}")
    if cutter.mode == "mask":
        with torch.no_grad():
            for g, rel in enumerate(relative):
                drop = _complement(rel, per_group_in)
                module.weight[g * rows : (g + 1) * rows].index_fill_(1, drop, 0.0)
        return
    per_row = torch.cat([rel.expand(rows, -1) for rel in relative])  # (out, kept inputs per group)
    index = per_row.view(*per_row.shape, *([1] * (module.weight.dim() - 2))).expand(
        -1, -1, *module.weight.shape[2:])
    cutter.gather(module, "weight", 1, index, tag=(tuple(keep.tolist()), tuple(module.weight.shape)))


@edit_layer.register
def _linear(module: nn.Linear, edit: LayerEdit, cutter: Cutter) -> None:
    out, inp = _long(edit.out), _long(edit.inp)
    cuts = ([(0, out)] if out is not None else []) + ([(1, inp)] if inp is not None else [])
    cutter.index(module, "weight", cuts)
    if out is not None:
        cutter.index(module, "bias", [(0, out)])
    if cutter.mode == "remove":
        module.out_features, module.in_features = (int(s) for s in module.weight.shape)


def _conv1d(module: nn.Module, edit: LayerEdit, cutter: Cutter) -> None:
    """Hugging Face ``Conv1D``: a linear layer whose weight is stored ``(in, out)``."""
    out, inp = _long(edit.out), _long(edit.inp)
    cuts = ([(1, out)] if out is not None else []) + ([(0, inp)] if inp is not None else [])
    cutter.index(module, "weight", cuts)
    if out is not None:
        cutter.index(module, "bias", [(0, out)])
    if cutter.mode == "remove":
        module.nx, module.nf = (int(s) for s in module.weight.shape)


@edit_layer.register(nn.modules.batchnorm._BatchNorm)
@edit_layer.register(nn.modules.instancenorm._InstanceNorm)
def _norm(module: nn.Module, edit: LayerEdit, cutter: Cutter) -> None:
    keep = _long(edit.out)
    if keep is None:
        return
    for name in ("weight", "bias"):
        cutter.index(module, name, [(0, keep)])
    if cutter.mode == "remove":
        # Statistics of removed channels go with them; in mask mode they do not matter
        # because the scale and shift are zero.
        for name in ("running_mean", "running_var"):
            cutter.index(module, name, [(0, keep)])
        module.num_features = len(keep)


@edit_layer.register
def _prelu(module: nn.PReLU, edit: LayerEdit, cutter: Cutter) -> None:
    keep = _long(edit.out)
    if keep is None or module.num_parameters == 1:
        return
    cutter.index(module, "weight", [(0, keep)])
    if cutter.mode == "remove":
        module.num_parameters = len(keep)


@edit_layer.register
def _embedding(module: nn.Embedding, edit: LayerEdit, cutter: Cutter) -> None:
    keep = _long(edit.out)
    if keep is None:
        return
    cutter.index(module, "weight", [(1, keep)])
    if cutter.mode == "remove":
        module.embedding_dim = len(keep)


@edit_layer.register
def _channel_map(module: ChannelPadShortcut, edit: LayerEdit, cutter: Cutter) -> None:
    index = module.index
    outputs = torch.arange(len(index)) if edit.out is None else _long(edit.out)
    inputs = torch.arange(module.in_channels) if edit.inp is None else _long(edit.inp)
    kept_in = torch.zeros(module.in_channels, dtype=torch.bool)
    kept_in[inputs] = True
    copies = (index >= 0) & kept_in[index.clamp_min(0)]  # entries whose input survives
    if cutter.mode == "mask":
        kept_out = torch.zeros(len(index), dtype=torch.bool)
        kept_out[outputs] = True
        module.index = torch.where(copies & kept_out, index, -1)
        return
    position = torch.full((module.in_channels,), -1, dtype=torch.long)
    position[inputs] = torch.arange(len(inputs))  # where each kept input lands
    module.index = torch.where(copies, position[index.clamp_min(0)], -1)[outputs]
    module.in_channels = len(inputs)


_GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}


@edit_layer.register(nn.LSTM)
@edit_layer.register(nn.GRU)
@edit_layer.register(nn.RNN)
def _rnn(module: nn.RNNBase, edit: LayerEdit, cutter: Cutter) -> None:
    """Hidden units (``out``) of every layer and direction, and the first layer's inputs (``inp``).

    Unit ``j`` owns row ``g·H + j`` of each gate ``g`` in ``weight_ih``/``weight_hh`` and the
    biases, column ``j`` of ``weight_hh``, and column ``j`` (and ``H + j`` for the reverse
    direction) of the next layer's ``weight_ih``. A zeroed unit stays exactly zero: its gate
    pre-activations are zero, so its cell and hidden state never leave zero.
    """
    hidden = module.hidden_size
    gates = next(g for kind, g in _GATES.items() if isinstance(module, kind))
    units, inputs = _long(edit.out), _long(edit.inp)
    suffixes = ("", "_reverse") if module.bidirectional else ("",)
    rows = None if units is None else torch.cat([units + g * hidden for g in range(gates)])
    below = None
    if units is not None:
        below = torch.cat([units + d * hidden for d in range(len(suffixes))])
    for layer in range(module.num_layers):
        for suffix in suffixes:
            ih_cuts: list[tuple[int, Tensor]] = []
            hh_cuts: list[tuple[int, Tensor]] = []
            if rows is not None:
                ih_cuts.append((0, rows))
                hh_cuts += [(0, rows), (1, units)]  # type: ignore[list-item]
            if layer == 0 and inputs is not None:
                ih_cuts.append((1, inputs))
            if layer > 0 and below is not None:
                ih_cuts.append((1, below))
            cutter.index(module, f"weight_ih_l{layer}{suffix}", ih_cuts)
            cutter.index(module, f"weight_hh_l{layer}{suffix}", hh_cuts)
            if rows is not None and module.bias:
                cutter.index(module, f"bias_ih_l{layer}{suffix}", [(0, rows)])
                cutter.index(module, f"bias_hh_l{layer}{suffix}", [(0, rows)])
    if cutter.mode == "remove":
        if units is not None:
            module.hidden_size = len(units)
        if inputs is not None:
            module.input_size = len(inputs)
        module._init_flat_weights()
