"""Torch-Pruning behind one module: the only file in spiralkit that imports ``torch_pruning``.

Why Torch-Pruning. The coupling between layers is found by Torch-Pruning's ``DependencyGraph``
(Fang et al. 2023, "DepGraph: Towards Any Structural Pruning"): it traces the autograd graph
of one forward pass and already knows residual additions, concatenation, split, flatten,
depthwise convolutions and the index arithmetic between them, and it works with our torch.
Writing that again would be a large and error-prone copy. spiralkit never lets Torch-Pruning
cut anything: its pruners are replaced by tokens that only report sizes.

What the rest of `spiralkit.graph` sees:

- `trace` runs a model once into a `Graph` (tolerantly: an index map that fails is
  recorded in `Graph.unmapped`, not raised);
- `Graph.walk` yields every `Step` reachable from a root layer's output channels: the node
  reached, the side of it that is cut and the channel indices (`Index`: each carries the
  root channel it came from);
- `op_kind`, `Graph.is_layer` and `Graph.cuts_outputs` answer the questions the op-safety
  rules and the group builder ask about a node;
- `torch_pruning_prune` is Torch-Pruning's own pruner, run as it is: the peer that
  ``spiral bench --peers`` and the benchmarks measure spiralkit against.

Torch-Pruning's private names (``_helpers._HybridIndex``, ``_trace``,
``_detect_unwrapped_parameters``, the ``ops._*Op`` classes, ``index_mapping``,
``shape_infer``) appear in this file only, so a Torch-Pruning upgrade changes this file alone.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch_pruning import _helpers, ops
from torch_pruning.dependency import index_mapping, shape_infer

from spiralkit.graph.forward import Example, ShapeRecorder, call_model, tensors
from spiralkit.graph.layers import CHANNEL_MAPS, RNN_TYPES, is_conv1d
from spiralkit.modules import preserve_modes

__all__ = ["Graph", "Handler", "Index", "Node", "OpKind", "Step", "op_kind", "torch_pruning_prune", "trace"]

# A node of the traced graph: a layer or an operation. spiralkit reads its ``module``,
# ``grad_fn`` (the autograd node; None for layers), ``inputs`` and ``outputs`` (nodes).
Node = tp.dependency.Node
# A channel index on a node (``idx``) with the root channel it derives from (``root_idx``).
Index = _helpers._HybridIndex
# Which side of a layer a dependency cuts; opaque, compared by `Graph.cuts_outputs`.
Handler = Any

OpKind = Literal["output", "parameter", "concat", "split", "unbind", "other"]
_KINDS: dict[Any, OpKind] = {
    ops.OPTYPE.OUTPUT: "output",
    ops.OPTYPE.PARAMETER: "parameter",
    ops.OPTYPE.CONCAT: "concat",
    ops.OPTYPE.SPLIT: "split",
    ops.OPTYPE.UNBIND: "unbind",
}
# Torch-Pruning's wrappers of operations: nodes whose module is one of these are not layers.
_OP_CLASSES = (ops._ElementWiseOp, ops._ConcatOp, ops._SplitOp, ops._ReshapeOp, ops._UnbindOp,
               ops._ExpandOp, ops._SliceOp, ops._OutputOp)


def op_kind(node: Node) -> OpKind:
    """What a node is, as far as the group builder and the op-safety rules care.

    Returns:
        ``"output"`` (the model output), ``"parameter"`` (a bare parameter used outside any
        layer), ``"concat"``, ``"split"``, ``"unbind"``, or ``"other"`` for anything else
        (layers and all remaining operations).
    """
    return _KINDS.get(node.type, "other")


class Step(NamedTuple):
    """A node reached from a group's root, and the channel indices it is reached with.

    Attributes:
        node: The node reached.
        handler: Which side of the node is cut (see `Graph.cuts_outputs`).
        indices: The node's channel indices, each with its root channel; None where
            Torch-Pruning's index map failed.
    """

    node: Node
    handler: Handler
    indices: list[Index] | None


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


def _channel_map_token() -> _Token:
    return _Token(lambda m: m.out_channels, lambda m: m.in_channels)


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


class Graph(tp.DependencyGraph):
    """Torch-Pruning's dependency graph, built tolerantly and annotated for spiralkit's checks.

    Build it with `trace`. Besides TP's own ``model`` and ``module2node`` (layer or
    operation → `Node`), it records:

    Attributes:
        inputs: For each traced layer, the autograd nodes of its inputs.
        calls: For each traced layer, how often it ran in the forward pass.
        shapes: For each autograd node, the shape of its output.
        outputs: The autograd nodes of the model's outputs.
        unmapped: Nodes whose index map failed, with the error.
        internal: Operation nodes created inside a traced layer's own forward pass → that
            layer's node.
    """

    def trace(self, model: nn.Module, example: Example, *, opaque: Iterable[nn.Module]) -> Graph:
        """Trace ``model`` on ``example``; ``opaque`` layers are traced as one node each, sizes unknown."""
        self.verbose = False
        self.model = model
        self._module2name = {module: name for name, module in model.named_modules()}
        for rnn in RNN_TYPES:  # TP's own LSTM pruner handles one layer only; GRU/RNN not at all
            self.register_customized_layer(rnn, _rnn_token())
        # A channel map is one layer with separate input and output sides: TP would otherwise
        # trace its gather and reject the residual stream it sits on.
        for kind in CHANNEL_MAPS:
            self.register_customized_layer(kind, _channel_map_token())
        # Hugging Face's Conv1D (GPT-2) is a linear layer with a transposed weight.
        for kind in {type(module) for module in model.modules() if is_conv1d(module)}:
            self.register_customized_layer(kind, _Token(lambda m: int(m.nf), lambda m: int(m.nx)))
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
        self.internal = self._internal_ops()
        return self

    def name(self, module: nn.Module) -> str:
        """The dotted name of a layer of the traced model."""
        return self._module2name[module]

    def parameter_name(self, module: Any) -> str:
        """The dotted name of a bare parameter (the ``module`` of a ``"parameter"`` node), or ``"?"``."""
        return self._param_to_name.get(module, "?")

    def is_layer(self, node: Node) -> bool:
        """Whether ``node`` is a layer of the model (not an operation, parameter or output)."""
        return isinstance(node.module, nn.Module) and node.module in self._module2name and not isinstance(
            node.module, _OP_CLASSES)

    def cuts_outputs(self, module: nn.Module, handler: Handler) -> bool:
        """Whether ``handler`` (of a `Step` reaching layer ``module``) cuts the layer's outputs."""
        return handler == self.get_pruner_of_module(module).prune_out_channels

    def walk(self, root: nn.Module, size: int) -> Iterator[Step]:
        """Torch-Pruning's group traversal from ``root``'s outputs, without re-deriving index maps.

        Yields every node reached, with its indices (each carrying its root channel), lazily
        so that the caller can stop at the first problem; the indices are None where an index
        map failed. An edge into the operations inside a layer's own forward pass leads
        straight to the layer's inputs, with the indices it had at the layer's boundary.

        Args:
            root: The layer whose output channels are followed.
            size: Its number of output channels.
        """
        node = self.module2node[root]
        fn = self.get_pruner_of_module(root).prune_out_channels
        start = tp.Dependency(fn, fn, source=node, target=node)
        idxs = [_helpers._HybridIndex(idx=i, root_idx=i) for i in range(size)]
        yield Step(start.target, start.handler, idxs)
        stack = [(start, idxs)]
        seen = {(node, fn, tuple(idxs))}
        while stack:
            dep, idxs = stack.pop()
            for new_dep in dep.target.dependencies:
                if not new_dep.is_triggered_by(dep.handler):
                    continue
                owner = self.internal.get(new_dep.target)
                if owner is not None:
                    if owner is dep.target:  # a layer's own internals, seen from the layer
                        continue
                    handler = self.get_pruner_of_module(owner.module).prune_in_channels
                    new_dep, new_idxs = tp.Dependency(new_dep.handler, handler, source=dep.target, target=owner), idxs
                else:
                    new_idxs = idxs
                    try:
                        for mapping in new_dep.index_mapping:
                            if mapping is not None:
                                new_idxs = mapping(new_idxs)
                    except Exception:  # a TP index map built from a wrong shape guess
                        yield Step(new_dep.target, new_dep.handler, None)
                        continue
                if not new_idxs:
                    continue
                key = (new_dep.target, new_dep.handler, tuple(new_idxs))
                if key in seen:
                    continue
                seen.add(key)
                yield Step(new_dep.target, new_dep.handler, new_idxs)
                stack.append((new_dep, new_idxs))

    def _record(self, model: nn.Module, example: Example) -> tuple[dict[nn.Module, set[Any]], dict[nn.Module, int]]:
        """Trace with TP while recording op shapes and each layer's input autograd nodes."""
        inputs: dict[nn.Module, set[Any]] = defaultdict(set)
        calls: dict[nn.Module, int] = defaultdict(int)
        traced = (*(ops.type2class(t) for t in self.REGISTERED_PRUNERS), *self.CUSTOMIZED_PRUNERS)

        def pre_hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            calls[module] += 1
            inputs[module].update(t.grad_fn for t in tensors((args, kwargs)))

        outputs: set[Any] = set()

        def output_hook(module: nn.Module, args: Any, out: Any) -> None:
            outputs.update(t.grad_fn for t in tensors(out) if t.grad_fn is not None)

        handles = [model.register_forward_hook(output_hook)] + [
            m.register_forward_pre_hook(pre_hook, with_kwargs=True)
            for m in model.modules()
            if isinstance(m, traced) and m not in self.IGNORED_LAYERS_IN_TRACING
        ]
        recorder = ShapeRecorder()
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

    def _internal_ops(self) -> dict[Node, Node]:
        """Operation nodes created inside a traced layer's own forward pass → that layer's node."""
        internal: dict[Node, Node] = {}
        for module, node in self.module2node.items():
            if not isinstance(module, nn.Module) or module not in self.inputs:
                continue
            boundary = self.inputs[module]
            stack = list(node.inputs)
            while stack:
                current = stack.pop()
                if current in internal or current.grad_fn in boundary or self.is_layer(current):
                    continue
                if op_kind(current) in ("parameter", "output"):
                    continue
                internal[current] = node
                stack.extend(current.inputs)
        return internal


def trace(model: nn.Module, example: Example, *, opaque: Iterable[nn.Module]) -> Graph:
    """Trace ``model`` once on ``example`` into Torch-Pruning's dependency graph.

    The model runs with gradients enabled (nothing is learned; its train/eval modes are
    restored).

    Args:
        model: The model.
        example: An input batch (see `spiralkit.graph.forward.call_model`).
        opaque: Layers traced as one node each, with unknown sizes (attention layers whose
            width is kept); nothing inside them is traced.

    Returns:
        The annotated graph.
    """
    return Graph().trace(model, example, opaque=opaque)


def _tensors_with_grad(out: Any) -> list[Tensor]:
    return [t for t in tensors(out) if t.grad_fn is not None]


def torch_pruning_prune(model: nn.Module, example: Tensor, *, ratio: float, ignored: Sequence[nn.Module] = ()) -> nn.Module:
    """Prune ``model`` in place with Torch-Pruning's own ``MetaPruner`` (group L2 magnitude, layer-wise).

    Not how spiralkit prunes (it plans with `trace` and cuts with `spiralkit.prune.apply`):
    the peer it is compared with, exactly as a Torch-Pruning user would call it.

    Args:
        model: The model; changed in place and returned.
        example: An input batch for tracing.
        ratio: Torch-Pruning's ``pruning_ratio``: the share of each group's channels removed.
        ignored: Layers Torch-Pruning must leave whole (e.g. the classifier).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                             pruning_ratio=ratio, ignored_layers=list(ignored)).step()
    return model
