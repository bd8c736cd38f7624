"""LeNet-300-100 and LeNet-5, as used by Han et al. (2015) "Learning both Weights and
Connections for Efficient Neural Networks" (Caffe model definitions)."""

from __future__ import annotations

from torch import Tensor, nn

from spiralkit.models.mlp import MLP, require_positive

__all__ = ["LeNet5", "lenet300", "lenet5"]


def lenet300(*, in_features: int = 784, num_classes: int = 10) -> MLP:
    """LeNet-300-100: ``flatten → fc1 (784→300) → ReLU → fc2 (300→100) → ReLU → fc3 (100→10)``.

    266,610 parameters with the defaults.

    Args:
        in_features: Number of input features after flattening (784 for 28x28 images).
        num_classes: Number of outputs.

    Returns:
        The model, freshly initialised.

    Raises:
        ValueError: A size is not a positive integer.
    """
    require_positive(in_features=in_features, num_classes=num_classes)
    return MLP(in_features=in_features, widths=(300, 100), num_classes=num_classes)


class LeNet5(nn.Module):
    """The Caffe LeNet-5: ``conv1 (20, 5x5) → maxpool 2 → conv2 (50, 5x5) → maxpool 2 →
    flatten → fc1 (→500) → ReLU → fc2``.

    Following Caffe's ``lenet_train_test.prototxt`` exactly, there is **no** ReLU after
    the convolutions; the only non-linearity is the ReLU after ``fc1``.

    Args:
        in_channels: Input image channels.
        num_classes: Number of outputs.
        image_size: Height and width of the (square) input images.
    """

    def __init__(self, *, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        side = lenet5_feature_side(image_size)
        self.conv1 = nn.Conv2d(in_channels, 20, kernel_size=5)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(batch, in_channels, image_size, image_size)`` to ``(batch, num_classes)``."""
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(x))
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


def lenet5_feature_side(image_size: int) -> int:
    """Side of the ``conv2`` feature map after pooling: ``((s - 4) // 2 - 4) // 2``.

    Args:
        image_size: Input height and width.

    Returns:
        4 for 28x28 inputs, 5 for 32x32 inputs.

    Raises:
        ValueError: The image is too small for two 5x5 convolutions and two 2x2 pools.
    """
    side = ((image_size - 4) // 2 - 4) // 2
    if side < 1:
        raise ValueError(f"image_size must be at least 16 for LeNet-5, got {image_size}")
    return side


def lenet5(*, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> LeNet5:
    """Build the Caffe LeNet-5 (see `LeNet5`); 431,080 parameters with the defaults.

    Args:
        in_channels: Input image channels.
        num_classes: Number of outputs.
        image_size: Height and width of the (square) input images.

    Returns:
        The model, freshly initialised.

    Raises:
        ValueError: A size is not a positive integer or the image is too small.
    """
    require_positive(in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    return LeNet5(in_channels=in_channels, num_classes=num_classes, image_size=image_size)
