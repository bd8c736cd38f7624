"""Tracing a model into groups of coupled channels: what must be cut together.

Removing output channel ``c`` of a convolution also removes input channel ``c`` of every
layer that reads it, entry ``c`` of the batch norm after it, and — through a residual
addition — channel ``c`` of every other layer feeding the same sum; through a concatenation
it becomes channel ``offset + c`` of the next layer's input; through a flatten it becomes
``H·W`` input features of a linear layer. A `ChannelGroup` is one such set: a root layer's
output channels and, for each coupled layer (a `Member`), which of its own indices each root
channel is. Cutting the same root channels from every member keeps the model consistent.

Why Torch-Pruning. The coupling is found by Torch-Pruning's ``DependencyGraph`` (Fang et al.
2023, "DepGraph: Towards Any Structural Pruning"): it traces the autograd graph of one
forward pass and already knows residual additions, concatenation, split, flatten, depthwise
convolutions and the index arithmetic between them, and it works with our torch. Writing
that again would be a large and error-prone copy. Everything else is spiralkit's own: the
graph is read into plain-data groups keyed by module *names* (so a plan replays on a fresh
copy of the model), importance is computed by `spiralkit.prune.structured_importance`, and
layers are cut or masked by `spiralkit.graph.slicing` — never by Torch-Pruning's pruners, so
that the masked and the physically pruned model are guaranteed to agree.

Trust, but check. Torch-Pruning treats every operation it does not know as element-wise, which
silently breaks models whose channels are permuted, split or mixed without a layer (a
channel shuffle, a softmax over channels, a custom layer with its own parameter). spiralkit
therefore accepts a group only when every operation on its path is one it knows to keep
channels apart (element-wise arithmetic and activations, pooling, reshapes that keep or
flatten the channel axis, concatenation along it), every layer on it can be sliced, and the
index maps are consistent. Any other group is left whole and reported, naming the layer or
operation: an unknown layer type never crashes pruning and never yields a broken model.
Groups normalised by LayerNorm or GroupNorm are left whole too (removing a channel changes
the statistics of the others, so no mask can stand in for removal); in transformers that is
the residual stream, whose attention heads and MLP neurons are pruned instead.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from math import prod
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch_pruning import _helpers, ops
from torch_pruning.dependency import index_mapping, shape_infer

from spiralkit.graph.attention import HeadGroup, find_attention
from spiralkit.modules import preserve_modes

__all__ = [
    "ChannelGroup",
    "Member",
    "ModelGroups",
    "Role",
    "Skipped",
    "call_model",
    "channel_size",
    "trace_groups",
]

Role = Literal["out", "in"]
Example = Tensor | Sequence[Any] | Mapping[str, Any]

RNN_TYPES: tuple[type[nn.Module], ...] = (nn.LSTM, nn.GRU, nn.RNN)
# Layers whose input and output channels are the same channels (cut together).
_COUPLED = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.PReLU, nn.Embedding,
            nn.LayerNorm, nn.GroupNorm)
_ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding, *RNN_TYPES)
_MAX_INDICES = 4_000_000


@dataclass(frozen=True)
class Member:
    """One layer's share of a channel group.

    Attributes:
        module: Dotted module name.
        role: ``"out"`` for the layer's output channels (for norms, embeddings and
            depthwise convolutions: their only channel axis), ``"in"`` for its inputs.
        size: The layer's size along that axis (e.g. ``in_features``).
        local: The layer's indices in the group, aligned with ``roots``.
        roots: For each entry of ``local``, the root channel it belongs to.
    """

    module: str
    role: Role
    size: int
    local: tuple[int, ...]
    roots: tuple[int, ...]


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together (see the module docstring).

    Attributes:
        id: The root: the module whose output channels define the group (its name).
        size: Number of root channels.
        members: Every coupled layer, the root first.
        blocks: For each root channel, the block it belongs to; grouped convolutions need
            every block to lose the same number of channels. All zeros when unconstrained.
    """

    id: str
    size: int
    members: tuple[Member, ...]
    blocks: tuple[int, ...] = ()

    @property
    def num_blocks(self) -> int:
        """How many equal blocks the channels come in (1 when unconstrained)."""
        return max(self.blocks) + 1 if self.blocks else 1

    def producers(self) -> tuple[Member, ...]:
        """Members that compute the channels (``out`` role of convolutions, linears, RNNs, embeddings)."""
        return tuple(m for m in self.members if m.role == "out")

    def consumers(self) -> tuple[Member, ...]:
        """Members that read the channels (``in`` role)."""
        return tuple(m for m in self.members if m.role == "in")


@dataclass(frozen=True)
class Skipped:
    """Something left unpruned, and why.

    Attributes:
        name: The group (its root module), layer or attention module.
        reason: A sentence naming the layer or operation responsible.
    """

    name: str
    reason: str


@dataclass(frozen=True)
class ModelGroups:
    """Everything of a model that structured pruning can cut, and what it cannot.

    Attributes:
        channels: Prunable channel groups, in model order.
        heads: Attention layers whose heads can be pruned.
        skipped: Groups and layers left whole, with the reason.
    """

    channels: tuple[ChannelGroup, ...]
    heads: tuple[HeadGroup, ...]
    skipped: tuple[Skipped, ...] = field(default=())

    def summary(self) -> str:
        """A short human-readable table of groups and skipped items."""
        lines = [f"{len(self.channels)} channel groups, {len(self.heads)} attention layers"]
        lines += [f"  group {g.id}: {g.size} channels, {len(g.members)} layers" for g in self.channels]
        lines += [f"  heads {h.module}: {h.num_heads} x {h.head_dim}" for h in self.heads]
        lines += [f"  skipped {s.name}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


def channel_size(module: nn.Module, role: Role) -> int | None:
    """The number of channels of ``module`` on side ``role``, or None for an unknown layer."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels if role == "out" else module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features if role == "out" else module.in_features
    if isinstance(module, RNN_TYPES):
        return module.hidden_size if role == "out" else module.input_size
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return module.num_features
    if isinstance(module, nn.PReLU):
        return module.num_parameters
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1])
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    return None


# --------------------------------------------------------------------------- Torch-Pruning glue


class _Token(tp.pruner.BasePruningFunc):
    """A Torch-Pruning "pruner" that only reports sizes: spiralkit never lets TP cut anything.

    ``prune_out_channels`` and ``prune_in_channels`` are distinct methods, so the graph does
    not couple the layer's inputs with its outputs.
    """

    def __init__(self, out: Any, inp: Any) -> None:
        super().__init__()
        self._out, self._in = out, inp

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise NotImplementedError("spiralkit slices layers itself")

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise NotImplementedError("spiralkit slices layers itself")

    def get_out_channels(self, layer: nn.Module) -> int | None:
        return self._out(layer)

    def get_in_channels(self, layer: nn.Module) -> int | None:
        return self._in(layer)


def _rnn_token() -> _Token:
    return _Token(lambda m: m.hidden_size, lambda m: m.input_size)


def _opaque_token() -> _Token:
    return _Token(lambda m: None, lambda m: None)


class _Bidirectional:
    """Index map from hidden unit ``j`` of a bidirectional RNN to output features ``j`` and ``H + j``."""

    def __init__(self, hidden: int, *, reverse: bool) -> None:
        self.hidden, self.reverse = hidden, reverse

    def __call__(self, idxs: list[Any]) -> list[Any]:
        if self.reverse:
            seen: dict[int, Any] = {}
            for i in idxs:
                seen.setdefault(i.idx % self.hidden, _helpers._HybridIndex(i.idx % self.hidden, i.root_idx))
            return list(seen.values())
        return [_helpers._HybridIndex(i.idx + k * self.hidden, i.root_idx) for k in (0, 1) for i in idxs]


class _ShapeRecorder(TorchFunctionMode):
    """Records the output shape of every autograd node created during a forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: dict[Any, tuple[int, ...]] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in _tensors(out):
            if tensor.grad_fn is not None:
                self.shapes.setdefault(tensor.grad_fn, tuple(tensor.shape))
        return out


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, Mapping):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


def call_model(model: nn.Module, example: Example) -> Any:
    """``model(example)`` for a tensor, ``model(*example)`` for a sequence, ``model(**example)`` for a mapping."""
    if isinstance(example, Tensor):
        return model(example)
    if isinstance(example, Mapping):
        return model(**example)
    return model(*example)


class _Graph(tp.DependencyGraph):
    """Torch-Pruning's dependency graph, built tolerantly and annotated for spiralkit's checks."""

    def trace(self, model: nn.Module, example: Example, *, opaque: Iterable[nn.Module]) -> _Graph:
        self.verbose = False
        self.model = model
        self._module2name = {module: name for name, module in model.named_modules()}
        for rnn in RNN_TYPES:  # TP's own LSTM pruner handles one layer only; GRU/RNN not at all
            self.register_customized_layer(rnn, _rnn_token())
        opaque_token = _opaque_token()
        for kind in {type(module) for module in opaque}:  # TP hooks customized layers by type
            self.register_customized_layer(kind, opaque_token)
        for module in model.modules():
            if type(module) in self.CUSTOMIZED_PRUNERS and not isinstance(module, RNN_TYPES):
                self.IGNORED_LAYERS_IN_TRACING.extend(m for m in module.modules() if m is not module)
        self.ignored_params = []
        self._param_to_name, self.unwrapped_parameters = self._detect_unwrapped_parameters(None)
        self.inputs, self.calls = self._record(model, example)
        self._build_dependency(self.module2node)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TP warns while guessing shapes; failures are recorded below
            try:
                shape_infer.init_shape_information(self)
            except Exception:  # only split sizes come from here, and splits are refused anyway
                pass
            self.unmapped = self._map_indices()
        self._map_bidirectional()
        return self

    def _record(self, model: nn.Module, example: Example) -> tuple[dict[nn.Module, set[Any]], dict[nn.Module, int]]:
        """Trace with TP while recording op shapes and each layer's input autograd nodes."""
        inputs: dict[nn.Module, set[Any]] = defaultdict(set)
        calls: dict[nn.Module, int] = defaultdict(int)
        traced = (*(ops.type2class(t) for t in self.REGISTERED_PRUNERS), *self.CUSTOMIZED_PRUNERS)

        def pre_hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            calls[module] += 1
            inputs[module].update(t.grad_fn for t in _tensors((args, kwargs)))

        outputs: set[Any] = set()

        def output_hook(module: nn.Module, args: Any, out: Any) -> None:
            outputs.update(t.grad_fn for t in _tensors(out) if t.grad_fn is not None)

        handles = [model.register_forward_hook(output_hook)] + [
            m.register_forward_pre_hook(pre_hook, with_kwargs=True)
            for m in model.modules()
            if isinstance(m, traced) and m not in self.IGNORED_LAYERS_IN_TRACING
        ]
        recorder = _ShapeRecorder()
        try:
            with preserve_modes(model), torch.enable_grad(), recorder, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.module2node = self._trace(model, example, call_model, output_transform=_tensors_with_grad)
        finally:
            for handle in handles:
                handle.remove()
        self.shapes = recorder.shapes
        self.outputs = outputs
        return inputs, calls

    def _map_indices(self) -> dict[Any, str]:
        """Torch-Pruning's index maps, node by node; a node that fails is recorded, not fatal."""
        updates = {
            ops.OPTYPE.CONCAT: index_mapping.update_concat_index_mapping,
            ops.OPTYPE.SPLIT: index_mapping.update_split_index_mapping,
            ops.OPTYPE.RESHAPE: index_mapping.update_reshape_index_mapping,
            ops.OPTYPE.UNBIND: index_mapping.update_unbind_index_mapping,
            ops.OPTYPE.EXPAND: index_mapping.update_expand_index_mapping,
            ops.OPTYPE.SLICE: index_mapping.update_slice_index_mapping,
        }
        failed: dict[Any, str] = {}
        for node in self.module2node.values():
            update = updates.get(node.type)
            if update is None:
                continue
            try:
                update(self, node)
            except Exception as exc:  # TP's shape inference fails on unusual graphs
                failed[node] = f"{type(exc).__name__}: {exc}"
        return failed

    def _map_bidirectional(self) -> None:
        for module, node in self.module2node.items():
            if isinstance(module, RNN_TYPES) and module.bidirectional:
                for dep in node.dependencies:
                    if dep.target in node.outputs:
                        dep.index_mapping[0] = _Bidirectional(module.hidden_size, reverse=False)
                for out in node.outputs:
                    for dep in out.dependencies:
                        if dep.target is node:
                            dep.index_mapping[0] = _Bidirectional(module.hidden_size, reverse=True)


def _tensors_with_grad(out: Any) -> list[Tensor]:
    return [t for t in _tensors(out) if t.grad_fn is not None]


# --------------------------------------------------------------------------- operations we trust


_POINTWISE = frozenset(
    "Add Sub Mul Div Neg Abs Pow Sqrt Rsqrt Exp Log Reciprocal Erf Clone ToCopy Alias Expand "
    "Relu Relu6 Hardtanh LeakyRelu Elu Selu Celu Gelu Silu Mish Sigmoid Hardsigmoid Hardswish Tanh "
    "Softplus Clamp ClampMin ClampMax Threshold NativeDropout Dropout Where MaskedFill AddcMul "
    "Unsqueeze Squeeze Transpose Permute T "
    "MaxPool1DWithIndices MaxPool2DWithIndices MaxPool3DWithIndices AvgPool2D AvgPool3D AvgPool1D "
    "AdaptiveAvgPool2D AdaptiveAvgPool3D AdaptiveMaxPool2D AdaptiveMaxPool3D "
    "UpsampleNearest2D UpsampleBilinear2D UpsampleNearest1D UpsampleNearest3D".split()
)
_REDUCTIONS = frozenset("Mean Sum Amax Amin Max Min Std Var Norm LinalgVectorNorm Logsumexp Prod".split())
_MIXING = {
    "Mm": "a matrix product mixes channels",
    "Bmm": "a matrix product mixes channels",
    "Addmm": "a matrix product mixes channels",
    "Baddbmm": "a matrix product mixes channels",
    "Matmul": "a matrix product mixes channels",
    "Einsum": "a tensor contraction mixes channels",
    "Convolution": "a functional convolution (not a layer) mixes channels",
    "NativeLayerNorm": "a functional layer norm normalises across channels",
    "NativeGroupNorm": "a functional group norm normalises across channels",
    "NativeBatchNorm": "a functional batch norm has per-channel parameters outside any layer",
    "ScaledDotProductEfficientAttention": "attention mixes channels",
    "ScaledDotProductFlashAttentionForCpu": "attention mixes channels",
}


def _op_name(grad_fn: Any) -> str:
    name = grad_fn.name() if hasattr(grad_fn, "name") else type(grad_fn).__name__
    return name.split("Backward")[0]


def _channel_dim(shape: Sequence[int], count: int, largest: int) -> int | None:
    """The axis of ``shape`` that holds a group's channels, by convention and by size.

    Convention: axis 1 for images (rank ≥ 4), the last axis otherwise. If that axis is too
    small for the indices seen, an axis whose size equals the channel count is used.
    """
    rank = len(shape)
    if rank == 0:
        return None
    usual = 1 if rank >= 4 else rank - 1
    if shape[usual] > largest:
        return usual
    return next((d for d, size in enumerate(shape) if size == count), None)


def _dims(value: Any, rank: int) -> set[int]:
    values = value if isinstance(value, (tuple, list)) else (value,)
    return {int(v) % rank for v in values} if rank else set()


def _check_op(graph: _Graph, node: Any, idxs: Sequence[Any]) -> str | None:
    """Why an operation on a group's path may break the model, or None when it is safe."""
    grad_fn = node.grad_fn
    name = _op_name(grad_fn)
    if name in _MIXING:
        return f"passes through {name} ({_MIXING[name]})"
    if node.type in (ops.OPTYPE.SPLIT, ops.OPTYPE.UNBIND):
        # TP offsets indices through a split on axis 1 (an unbind on axis 0) whatever that axis holds.
        shape = getattr(grad_fn, "_saved_self_sym_sizes", None)
        mapped = 1 if node.type == ops.OPTYPE.SPLIT else 0
        if shape is not None and hasattr(grad_fn, "_saved_dim"):
            dim = int(grad_fn._saved_dim) % len(shape)
            if dim != mapped and dim != _channel_dim(shape, _count(idxs), _largest(idxs)):
                return None
        return f"passes through {name} (it splits the channels with sizes fixed in the model's code)"
    if name in _POINTWISE:
        return None
    shape = graph.shapes.get(grad_fn)
    saved = getattr(grad_fn, "_saved_self_sym_sizes", None)
    source = tuple(int(s) for s in saved) if saved is not None else None
    if name in _REDUCTIONS:
        return _check_reduction(name, grad_fn, source, idxs)
    if name in ("View", "Reshape", "UnsafeView", "ReshapeAlias", "Flatten"):
        return _check_reshape(name, source, shape, idxs)
    if name == "Cat":
        return _check_cat(shape, idxs, int(grad_fn._saved_dim))
    if name in ("Softmax", "LogSoftmax"):
        return _check_axis_op(name, shape, idxs, grad_fn._saved_dim, allowed=None, why="normalises")
    if name in ("Slice", "Select", "Roll", "Flip", "Cumsum"):
        dim = getattr(grad_fn, "_saved_dim", getattr(grad_fn, "_saved_dims", None))
        ref = source if source is not None else shape
        if name == "Slice" and ref is not None and _full_slice(grad_fn, ref):
            return None
        return _check_axis_op(name, ref, idxs, dim, allowed=None, why="indexes")
    if name == "ConstantPadNd":
        return _check_pad(shape, idxs, grad_fn._saved_pad)
    return f"passes through {name}, an operation spiralkit does not know to keep channels apart"


def _count(idxs: Sequence[Any]) -> int:
    return len({i.idx for i in idxs})


def _largest(idxs: Sequence[Any]) -> int:
    return max((i.idx for i in idxs), default=0)


def _full_slice(grad_fn: Any, shape: Sequence[int]) -> bool:
    dim = int(grad_fn._saved_dim) % len(shape)
    start, end, step = grad_fn._saved_start, grad_fn._saved_end, grad_fn._saved_step
    return (start in (0, None)) and step == 1 and (end is None or int(end) >= shape[dim])


def _check_reduction(name: str, grad_fn: Any, source: tuple[int, ...] | None, idxs: Sequence[Any]) -> str | None:
    dims = getattr(grad_fn, "_saved_dim", None)
    if source is None or dims is None or (isinstance(dims, (tuple, list)) and not dims):
        return f"passes through {name} over the whole tensor (it mixes channels)"
    channel = _channel_dim(source, _count(idxs), _largest(idxs))
    if channel is None:
        return f"passes through {name} on a tensor of shape {source} whose channel axis is unclear"
    if channel in _dims(dims, len(source)):
        return f"passes through {name} over the channel axis (it mixes channels)"
    return None


def _check_axis_op(name: str, shape: Sequence[int] | None, idxs: Sequence[Any], dim: Any, *, allowed: int | None, why: str) -> str | None:
    if shape is None or dim is None:
        return f"passes through {name} on a tensor whose shape is unknown"
    channel = _channel_dim(shape, _count(idxs), _largest(idxs))
    if channel is None:
        return f"passes through {name} on a tensor of shape {tuple(shape)} whose channel axis is unclear"
    if channel in _dims(dim, len(shape)) and channel != allowed:
        return f"passes through {name}, which {why} along the channel axis"
    return None


def _check_cat(shape: Sequence[int] | None, idxs: Sequence[Any], dim: int) -> str | None:
    # TP offsets indices through a concatenation on axis 1 (and only there), whatever that axis holds.
    if shape is None:
        return "passes through Cat on a tensor whose shape is unknown"
    channel = _channel_dim(shape, _count(idxs), _largest(idxs))
    dim %= len(shape)
    if (channel == dim) == (dim == 1):
        return None
    if channel == dim:
        return f"passes through Cat along axis {dim}, the channel axis (only axis 1 is mapped)"
    return "passes through Cat along axis 1, which is not the channel axis here"


def _check_pad(shape: Sequence[int] | None, idxs: Sequence[Any], pad: Sequence[int]) -> str | None:
    if shape is None:
        return "passes through ConstantPadNd on a tensor whose shape is unknown"
    channel = _channel_dim(shape, _count(idxs), _largest(idxs))
    pairs = [tuple(pad[i : i + 2]) for i in range(0, len(pad), 2)]
    touched = {len(shape) - 1 - k for k, pair in enumerate(pairs) if any(int(p) != 0 for p in pair)}
    if channel is None or channel in touched:
        return "passes through ConstantPadNd, which pads the channel axis"
    return None


def _check_reshape(name: str, source: tuple[int, ...] | None, shape: Sequence[int] | None, idxs: Sequence[Any]) -> str | None:
    """A reshape is safe when it keeps the channel axis whole or flattens it with the axes after it.

    The indices may already be in output coordinates (TP maps a flatten on the edge into the
    reshape), so the channel axis is looked for on both sides.
    """
    if source is None or shape is None:
        return f"passes through {name} between unknown shapes"
    shape = tuple(int(s) for s in shape)
    count, largest = _count(idxs), _largest(idxs)
    channel = _channel_dim(source, count, largest)
    if channel is not None and _flattens(source, channel, shape):
        return None
    channel = _channel_dim(shape, count, largest)
    if channel is not None and any(_flattens(source, c, shape) and prod(source[:c]) == prod(shape[:channel])
                                   for c in range(len(source))):
        return None
    return (f"passes through {name} from {source} to {shape}, which splits or mixes the channel axis "
            "(a channel shuffle?)")


def _flattens(source: Sequence[int], channel: int, shape: Sequence[int]) -> bool:
    """Whether ``shape`` has an axis holding source axes ``channel..channel+m`` flattened (m ≥ 1)."""
    lead = prod(source[:channel])
    for j in range(len(shape)):
        if prod(shape[:j]) == lead and any(
            shape[j] == prod(source[channel : channel + m]) for m in range(1, len(source) - channel + 1)
        ):
            return True
    return False


# --------------------------------------------------------------------------- groups


@dataclass
class _Draft:
    """A group under construction: members and the reasons it cannot be pruned."""

    root: str
    size: int
    slots: dict[tuple[str, Role], dict[int, int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    reached: set[tuple[str, Role]] = field(default_factory=set)
    concat: bool = False


def _walk(graph: _Graph, root: nn.Module, size: int, internal: Mapping[Any, Any]) -> Iterator[tuple[Any, list[Any] | None]]:
    """Torch-Pruning's group traversal from ``root``'s outputs, without re-deriving index maps.

    Yields every ``(dependency, indices)`` reached (indices carry their root channel), lazily
    so that the caller can stop at the first problem; ``indices`` is None where an index map
    failed. An edge into the operations inside a layer's own forward pass leads straight to
    the layer's inputs, with the indices it had at the layer's boundary.
    """
    node = graph.module2node[root]
    fn = graph.get_pruner_of_module(root).prune_out_channels
    start = tp.Dependency(fn, fn, source=node, target=node)
    idxs = [_helpers._HybridIndex(idx=i, root_idx=i) for i in range(size)]
    yield start, idxs
    stack = [(start, idxs)]
    seen = {(node, fn, tuple(idxs))}
    while stack:
        dep, idxs = stack.pop()
        for new_dep in dep.target.dependencies:
            if not new_dep.is_triggered_by(dep.handler):
                continue
            owner = internal.get(new_dep.target)
            if owner is not None:
                if owner is dep.target:  # a layer's own internals, seen from the layer
                    continue
                handler = graph.get_pruner_of_module(owner.module).prune_in_channels
                new_dep, new_idxs = tp.Dependency(new_dep.handler, handler, source=dep.target, target=owner), idxs
            else:
                new_idxs = idxs
                try:
                    for mapping in new_dep.index_mapping:
                        if mapping is not None:
                            new_idxs = mapping(new_idxs)
                except Exception:  # a TP index map built from a wrong shape guess
                    yield new_dep, None
                    continue
            if not new_idxs:
                continue
            key = (new_dep.target, new_dep.handler, tuple(new_idxs))
            if key in seen:
                continue
            seen.add(key)
            yield new_dep, new_idxs
            stack.append((new_dep, new_idxs))


def _internal_ops(graph: _Graph) -> dict[Any, Any]:
    """Operation nodes created inside a traced layer's own forward pass → that layer's node."""
    internal: dict[Any, Any] = {}
    for module, node in graph.module2node.items():
        if not isinstance(module, nn.Module) or module not in graph.inputs:
            continue
        boundary = graph.inputs[module]
        stack = list(node.inputs)
        while stack:
            current = stack.pop()
            if current in internal or current.grad_fn in boundary or _is_layer(graph, current):
                continue
            if current.type in (ops.OPTYPE.PARAMETER, ops.OPTYPE.OUTPUT):
                continue
            internal[current] = node
            stack.extend(current.inputs)
    return internal


def _is_layer(graph: _Graph, node: Any) -> bool:
    return isinstance(node.module, nn.Module) and node.module in graph._module2name and not isinstance(
        node.module, (ops._ElementWiseOp, ops._ConcatOp, ops._SplitOp, ops._ReshapeOp, ops._UnbindOp,
                      ops._ExpandOp, ops._SliceOp, ops._OutputOp))


def _role(graph: _Graph, module: nn.Module, handler: Any) -> Role:
    if isinstance(module, _COUPLED) or _is_depthwise(module):
        return "out"
    return "out" if handler == graph.get_pruner_of_module(module).prune_out_channels else "in"


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.in_channels == module.out_channels


def _near(graph: _Graph, node: Any, depth: int = 6) -> str:
    """The name of a layer next to an operation node, for messages."""
    frontier, seen = [node], set()
    for _ in range(depth):
        nxt = []
        for current in frontier:
            for other in (*current.inputs, *current.outputs):
                if other in seen:
                    continue
                seen.add(other)
                if _is_layer(graph, other):
                    return graph._module2name[other.module]
                nxt.append(other)
        frontier = nxt
    return "?"


def _layer_problem(module: nn.Module, name: str, role: Role, graph: _Graph, opaque: set[int]) -> str | None:
    kind = type(module).__name__
    if id(module) in opaque:
        return f"feeds or leaves {kind} {name!r}, whose width is kept (its heads are pruned instead)"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        return f"is normalised across channels by {kind} {name!r}"
    if graph.calls.get(module, 0) > 1:
        return f"{kind} {name!r} is called more than once per forward pass"
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed and module.groups > 1:
        return f"{kind} {name!r} is a grouped transposed convolution"
    if isinstance(module, nn.LSTM) and module.proj_size > 0:
        return f"{kind} {name!r} has projections (proj_size > 0)"
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and not _is_depthwise(module):
        per_group = (module.in_channels if role == "in" else module.out_channels) // module.groups
        if role == "in" and per_group == 1:
            return f"{kind} {name!r} has one input channel per group and {module.out_channels} outputs"
    if channel_size(module, role) is None:
        return f"{kind} {name!r} is a layer type spiralkit cannot slice"
    return None


def _draft(graph: _Graph, root: nn.Module, internal: Mapping[Any, Any], opaque: set[int]) -> _Draft:
    root_name = graph._module2name[root]
    size = channel_size(root, "out") or 0
    draft = _Draft(root=root_name, size=size)
    for dep, idxs in _walk(graph, root, size, internal):
        if draft.problems:  # one reason is enough; stop before the index lists explode
            break
        node = dep.target
        module = node.module
        if idxs is None:
            draft.problems.append(f"Torch-Pruning cannot map the channel indices near {_near(graph, node)!r}")
            continue
        if len(idxs) > _MAX_INDICES:
            draft.problems.append(f"the channel indices multiply beyond {_MAX_INDICES} near {_near(graph, node)!r}")
            continue
        if node in graph.unmapped:
            draft.problems.append(f"Torch-Pruning cannot map indices near {_near(graph, node)!r}: {graph.unmapped[node]}")
        if node.type == ops.OPTYPE.OUTPUT or (
            node.grad_fn in graph.outputs and not (_is_layer(graph, node) and _role(graph, module, dep.handler) == "in")
        ):
            draft.problems.append("reaches the model output")
        elif node.type == ops.OPTYPE.PARAMETER:
            name = graph._param_to_name.get(module, "?")
            owner = graph.model.get_submodule(name.rpartition(".")[0]) if "." in name else graph.model
            draft.problems.append(
                f"touches parameter {name!r} of {type(owner).__name__}, a layer type spiralkit cannot slice")
        elif _is_layer(graph, node):
            name = graph._module2name[module]
            role = _role(graph, module, dep.handler)
            draft.reached.add((name, role))
            problem = _layer_problem(module, name, role, graph, opaque)
            if problem:
                draft.problems.append(problem)
                continue
            if isinstance(module, nn.PReLU) and module.num_parameters == 1:
                continue
            slot = draft.slots.setdefault((name, role), {})
            for i in idxs:
                if slot.setdefault(i.idx, i.root_idx) != i.root_idx:
                    draft.problems.append(f"index {i.idx} of {name!r} maps to two root channels")
                    break
        else:
            draft.concat = draft.concat or node.type == ops.OPTYPE.CONCAT
            problem = _check_op(graph, node, idxs)
            if problem:
                draft.problems.append(f"{problem} near {_near(graph, node)!r}")
    return draft


def _finish(graph: _Graph, draft: _Draft) -> ChannelGroup | str:
    """Turn a draft into a group, or return why it cannot be one."""
    if draft.problems:
        return draft.problems[0]
    members = []
    for (name, role), slot in draft.slots.items():
        module = graph.model.get_submodule(name)
        size = channel_size(module, role) or 0
        local = tuple(sorted(slot))
        if local and (local[0] < 0 or local[-1] >= size):
            return f"indices of {name!r} fall outside its {size} channels"
        if len(local) != size and not draft.concat:
            return f"{name!r} would lose {len(local)} of {size} channels per {draft.size} root channels (unexpected shape)"
        members.append(Member(module=name, role=role, size=size, local=local, roots=tuple(slot[i] for i in local)))
    blocks = _blocks(graph, draft.size, members)
    if isinstance(blocks, str):
        return blocks
    return ChannelGroup(id=draft.root, size=draft.size, members=tuple(members), blocks=blocks)


def _blocks(graph: _Graph, size: int, members: Sequence[Member]) -> tuple[int, ...] | str:
    """Root channel → block, from the grouped convolutions among the members."""
    assignment: tuple[int, ...] | None = None
    for member in members:
        module = graph.model.get_submodule(member.module)
        if not isinstance(module, nn.modules.conv._ConvNd) or module.groups == 1 or _is_depthwise(module):
            continue
        per_group = member.size // module.groups
        block = [0] * size
        for local, root in zip(member.local, member.roots):
            block[root] = local // per_group
        candidate = tuple(block)
        if assignment is not None and candidate != assignment:
            return f"grouped convolutions split the channels of {member.module!r} differently from each other"
        if len(member.local) != member.size:
            return f"grouped convolution {member.module!r} sees only part of the group"
        assignment = candidate
    return assignment if assignment is not None else ()


def _untie(graph: _Graph, groups: list[ChannelGroup]) -> tuple[list[ChannelGroup], list[Skipped]]:
    """Refuse groups that would cut a parameter shared (tied) with a layer outside the same slot."""
    users: dict[int, set[tuple[str, Role, str]]] = defaultdict(set)
    owners: dict[int, set[str]] = defaultdict(set)
    for name, module in graph.model.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False):
            owners[id(param)].add(name)
    shared = {pid for pid, names in owners.items() if len(names) > 1}
    if not shared:
        return groups, []
    for group in groups:
        for member in group.members:
            module = graph.model.get_submodule(member.module)
            for param in module.parameters(recurse=False):
                if id(param) in shared:
                    users[id(param)].add((group.id, member.role, member.module))
    bad: dict[str, str] = {}
    for group in groups:
        for member in group.members:
            module = graph.model.get_submodule(member.module)
            for param in module.parameters(recurse=False):
                pid = id(param)
                if pid not in shared:
                    continue
                cut_by = {g for g, _, _ in users[pid]}
                if len(cut_by) > 1 or len(users[pid]) < len(owners[pid]):
                    others = ", ".join(sorted(owners[pid] - {member.module}))
                    bad[group.id] = f"a weight of {member.module!r} is shared with {others} (tied), which this group would not cut alike"
    return [g for g in groups if g.id not in bad], [Skipped(g, r) for g, r in bad.items()]


def trace_groups(model: nn.Module, example: Example, *, heads: bool = True) -> ModelGroups:
    """Trace ``model`` on ``example`` into coupled channel groups and attention heads.

    The model is run once with gradients enabled (nothing is learned; its train/eval modes
    are restored). Groups are rooted at convolutions, linear layers, embeddings and RNNs,
    in model order; each layer's output channels belong to one group.

    Args:
        model: The model.
        example: An input batch: a tensor, a tuple of positional inputs or a dict of
            keyword inputs (e.g. ``{"input_ids": ...}``).
        heads: Whether attention layers are reported as prunable head groups.

    Returns:
        The prunable groups and everything left whole, with reasons.
    """
    head_groups, unsupported, opaque = find_attention(model)
    graph = _Graph().trace(model, example, opaque=opaque)
    internal = _internal_ops(graph)
    opaque_ids = {id(m) for m in opaque}
    covered: set[tuple[str, Role]] = set()
    groups: list[ChannelGroup] = []
    skipped: list[Skipped] = [Skipped(name, reason) for name, reason in unsupported.items()]
    for name, module in model.named_modules():
        if not isinstance(module, _ROOT_TYPES) or module not in graph.module2node or (name, "out") in covered:
            continue
        covered.add((name, "out"))
        problem = _layer_problem(module, name, "out", graph, opaque_ids)
        if problem:
            skipped.append(Skipped(name, problem))
            continue
        draft = _draft(graph, module, internal, opaque_ids)
        covered.update(draft.reached)
        result = _finish(graph, draft)
        if isinstance(result, str):
            skipped.append(Skipped(name, result))
        else:
            groups.append(result)
    groups, untied = _untie(graph, groups)
    skipped.extend(untied)
    for name, module in model.named_modules():
        if isinstance(module, _ROOT_TYPES) and module not in graph.module2node and not any(
            id(module) in {id(s) for s in o.modules()} for o in opaque
        ):
            skipped.append(Skipped(name, (
                f"{type(module).__name__} {name!r} did not run on the example (the model is traced in eval mode); "
                "it is left whole, and if it runs in another mode (e.g. a training-only auxiliary head) "
                "its inputs may no longer fit: remove it before pruning")))
    if not heads:
        skipped.extend(Skipped(h.module, "attention heads are not pruned (heads=False)") for h in head_groups)
        head_groups = []
    return ModelGroups(channels=tuple(groups), heads=tuple(head_groups), skipped=tuple(skipped))
