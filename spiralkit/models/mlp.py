"""Multi-layer perceptrons: flatten, then Linear/ReLU layers named ``fc1 .. fcN``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["MLP", "mlp", "require_positive"]


def require_positive(**sizes: int) -> None:
    """Check that every size argument of a model builder is a positive ``int``.

    Args:
        **sizes: Argument name → value.

    Raises:
        ValueError: Naming the first argument that is not a positive integer.
    """
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class MLP(nn.Module):
    """``flatten → fc1 → ReLU → … → fcN`` with no ReLU after the last layer.

    ReLUs are separate modules (``relu1 .. relu{N-1}``) so that forward hooks and
    quantization fusion see each one exactly once.

    Args:
        in_features: Number of input features after flattening.
        widths: Hidden layer widths; ``len(widths) + 1`` linear layers in total.
        num_classes: Output features of the last layer.
    """

    def __init__(self, *, in_features: int, widths: Sequence[int], num_classes: int) -> None:
        super().__init__()
        sizes = [in_features, *widths, num_classes]
        self.flatten = nn.Flatten()
        self.depth = len(sizes) - 1
        for index in range(1, self.depth + 1):
            self.add_module(f"fc{index}", nn.Linear(sizes[index - 1], sizes[index]))
            if index < self.depth:
                self.add_module(f"relu{index}", nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(batch, *)`` inputs with ``in_features`` elements each to ``(batch, num_classes)``."""
        x = self.flatten(x)
        for index in range(1, self.depth + 1):
            x = getattr(self, f"fc{index}")(x)
            if index < self.depth:
                x = getattr(self, f"relu{index}")(x)
        return x


def mlp(*, in_features: int = 784, widths: Sequence[int] = (256, 128), num_classes: int = 10) -> MLP:
    """Build an MLP (see `MLP`).

    Args:
        in_features: Number of input features after flattening (784 for 28x28 images).
        widths: Hidden layer widths.
        num_classes: Number of outputs.

    Returns:
        The model, freshly initialised.

    Raises:
        ValueError: A size is not a positive integer.
    """
    widths = tuple(widths)
    require_positive(in_features=in_features, num_classes=num_classes)
    require_positive(**{f"widths[{index}]": width for index, width in enumerate(widths)})
    return MLP(in_features=in_features, widths=widths, num_classes=num_classes)
