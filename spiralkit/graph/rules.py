"""Op-safety rules: which operations and layers channel pruning may pass through, and why not.

Trust, but check. Torch-Pruning treats every operation it does not know as element-wise, which
silently breaks models whose channels are permuted, split or mixed without a layer (a
channel shuffle, a softmax over channels, a custom layer with its own parameter). spiralkit
therefore accepts a group only when every operation on its path is one it knows to keep
channels apart (element-wise arithmetic and activations, pooling, reshapes that keep or
flatten the channel axis, concatenation along it), every layer on it can be sliced, and the
index maps are consistent. `check_op` and `layer_problem` return the reason a group is left
whole — a sentence naming the operation or layer — or None when it is safe, so an unknown
layer type never crashes pruning and never yields a broken model. Groups normalised by
LayerNorm or GroupNorm are left whole too (removing a channel changes the statistics of the
others, so no mask can stand in for removal); in transformers that is the residual stream,
whose attention heads and MLP neurons are pruned instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod
from typing import Any

from torch import nn

from spiralkit.graph.layers import Role, channel_size, is_depthwise
from spiralkit.graph.tp import Graph, Index, Node, op_kind

__all__ = ["check_op", "layer_problem"]

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


def check_op(graph: Graph, node: Node, idxs: Sequence[Index]) -> str | None:
    """Why an operation on a group's path may break the model, or None when it is safe."""
    grad_fn = node.grad_fn
    name = _op_name(grad_fn)
    if name in _MIXING:
        return f"passes through {name} ({_MIXING[name]})"
    kind = op_kind(node)
    if kind in ("split", "unbind"):
        # TP offsets indices through a split on axis 1 (an unbind on axis 0) whatever that axis holds.
        shape = getattr(grad_fn, "_saved_self_sym_sizes", None)
        mapped = 1 if kind == "split" else 0
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


def _count(idxs: Sequence[Index]) -> int:
    return len({i.idx for i in idxs})


def _largest(idxs: Sequence[Index]) -> int:
    return max((i.idx for i in idxs), default=0)


def _full_slice(grad_fn: Any, shape: Sequence[int]) -> bool:
    dim = int(grad_fn._saved_dim) % len(shape)
    start, end, step = grad_fn._saved_start, grad_fn._saved_end, grad_fn._saved_step
    return (start in (0, None)) and step == 1 and (end is None or int(end) >= shape[dim])


def _check_reduction(name: str, grad_fn: Any, source: tuple[int, ...] | None, idxs: Sequence[Index]) -> str | None:
    dims = getattr(grad_fn, "_saved_dim", None)
    if source is None or dims is None or (isinstance(dims, (tuple, list)) and not dims):
        return f"passes through {name} over the whole tensor (it mixes channels)"
    channel = _channel_dim(source, _count(idxs), _largest(idxs))
    if channel is None:
        return f"passes through {name} on a tensor of shape {source} whose channel axis is unclear"
    if channel in _dims(dims, len(source)):
        return f"passes through {name} over the channel axis (it mixes channels)"
    return None


def _check_axis_op(name: str, shape: Sequence[int] | None, idxs: Sequence[Index], dim: Any, *, allowed: int | None, why: str) -> str | None:
    if shape is None or dim is None:
        return f"passes through {name} on a tensor whose shape is unknown"
    channel = _channel_dim(shape, _count(idxs), _largest(idxs))
    if channel is None:
        return f"passes through {name} on a tensor of shape {tuple(shape)} whose channel axis is unclear"
    if channel in _dims(dim, len(shape)) and channel != allowed:
        return f"passes through {name}, which {why} along the channel axis"
    return None


def _check_cat(shape: Sequence[int] | None, idxs: Sequence[Index], dim: int) -> str | None:
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


def _check_pad(shape: Sequence[int] | None, idxs: Sequence[Index], pad: Sequence[int]) -> str | None:
    if shape is None:
        return "passes through ConstantPadNd on a tensor whose shape is unknown"
    channel = _channel_dim(shape, _count(idxs), _largest(idxs))
    pairs = [tuple(pad[i : i + 2]) for i in range(0, len(pad), 2)]
    touched = {len(shape) - 1 - k for k, pair in enumerate(pairs) if any(int(p) != 0 for p in pair)}
    if channel is None or channel in touched:
        return "passes through ConstantPadNd, which pads the channel axis"
    return None


def _check_reshape(name: str, source: tuple[int, ...] | None, shape: Sequence[int] | None, idxs: Sequence[Index]) -> str | None:
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


def layer_problem(module: nn.Module, name: str, role: Role, graph: Graph, opaque: set[int]) -> str | None:
    """Why a group may not cut side ``role`` of layer ``module``, or None when it may.

    Args:
        module: The layer.
        name: Its dotted name, for the message.
        role: The side the group would cut.
        graph: The traced graph (for how often the layer runs).
        opaque: ``id`` of the layers whose width is kept (attention layers).
    """
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
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and not is_depthwise(module):
        per_group = (module.in_channels if role == "in" else module.out_channels) // module.groups
        if role == "in" and per_group == 1:
            return f"{kind} {name!r} has one input channel per group and {module.out_channels} outputs"
    if channel_size(module, role) is None:
        return f"{kind} {name!r} is a layer type spiralkit cannot slice"
    return None
