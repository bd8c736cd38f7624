"""Running a model once on an example: how it is called, which tensors it returns, their shapes.

Tracing (`spiralkit.graph.tp`) and block finding call the model on an example batch; these
helpers fix the calling convention in one place and record what the pass produced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["Example", "ShapeRecorder", "call_model", "detach_cached", "tensors"]

Example = Tensor | Sequence[Any] | Mapping[str, Any]


def call_model(model: nn.Module, example: Example) -> Any:
    """``model(example)`` for a tensor, ``model(*example)`` for a sequence, ``model(**example)`` for a mapping."""
    if isinstance(example, Tensor):
        return model(example)
    if isinstance(example, Mapping):
        return model(**example)
    return model(*example)


def tensors(obj: Any) -> list[Tensor]:
    """Every tensor in ``obj``, looking inside lists, tuples and mappings (depth first, in order).

    Args:
        obj: A tensor, or a (nested) container of them; anything else holds no tensor.

    Returns:
        The tensors found.
    """
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in tensors(item)]
    if isinstance(obj, Mapping):
        return [t for item in obj.values() for t in tensors(item)]
    return []


def detach_cached(model: nn.Module) -> None:
    """Detach the tensors a forward pass with gradients left in modules' plain attributes.

    Some modules cache what they compute between calls (timm's LeViT keeps its attention
    biases per device in eval mode). A traced or scored pass runs with gradients enabled, so
    such a cache holds tensors attached to that pass's graph, which keeps the graph alive and
    makes ``copy.deepcopy(model)`` fail. Their values are kept; only the graph is dropped.
    Parameters, buffers and submodules (the ``_``-prefixed registries) are not touched.
    """
    for module in model.modules():
        state = vars(module)
        for name, value in list(state.items()):
            if not name.startswith("_") and _has_graph(value):
                state[name] = _detached(value)


def _has_graph(obj: Any) -> bool:
    if isinstance(obj, Tensor):
        return obj.grad_fn is not None
    if isinstance(obj, (list, tuple)):
        return any(_has_graph(item) for item in obj)
    if isinstance(obj, dict):
        return any(_has_graph(item) for item in obj.values())
    return False


def _detached(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach() if obj.grad_fn is not None else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detached(item) for item in obj)
    if isinstance(obj, dict):
        return {key: _detached(item) for key, item in obj.items()}
    return obj


class ShapeRecorder(TorchFunctionMode):
    """Records the output shape of every autograd node created during a forward pass.

    Attributes:
        shapes: For each autograd node (``grad_fn``), the shape of the first tensor it made.
    """

    def __init__(self) -> None:
        super().__init__()
        self.shapes: dict[Any, tuple[int, ...]] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tensors(out):
            if tensor.grad_fn is not None:
                self.shapes.setdefault(tensor.grad_fn, tuple(tensor.shape))
        return out
