"""Running a model once on an example: how it is called, which tensors it returns, their shapes.

Tracing (`spiralkit.graph.tp`) and block finding call the model on an example batch; these
helpers fix the calling convention in one place and record what the pass produced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["Example", "ShapeRecorder", "call_model", "tensors"]

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
