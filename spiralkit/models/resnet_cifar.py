"""CIFAR ResNets of He et al. (2016) "Deep Residual Learning for Image Recognition", §4.2.

A 3x3 stem conv (16 channels), then three stages of ``n`` BasicBlocks with 16, 32 and 64
channels (stride 2 at the start of stages 2 and 3), global average pooling and a linear
classifier: depth ``6n + 2`` (ResNet-20: n=3, ResNet-56: n=9). Where a block changes the
shape, the shortcut is a 1x1 conv + BatchNorm projection (the paper's option B), so every
layer is an ordinary module that pruning and quantization can handle. Global average
pooling makes the nets work on any input size, e.g. 28x28 MNIST with ``in_channels=1``.
"""

from __future__ import annotations

from torch import Tensor, nn

from spiralkit.models.mlp import require_positive

__all__ = ["BasicBlock", "CifarResNet", "resnet20", "resnet56"]

_STAGE_CHANNELS = (16, 32, 64)


class BasicBlock(nn.Module):
    """``conv1 → bn1 → relu1 → conv2 → bn2 (+ shortcut) → relu2``.

    The two ReLUs are separate modules so a forward hook on either fires once per call.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of ``conv1`` (and of the projection shortcut).
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        """Residual block forward pass."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + shortcut)


class CifarResNet(nn.Module):
    """A ResNet with three stages of ``blocks_per_stage`` BasicBlocks (see module docstring).

    Module names: ``conv1, bn1, relu, layer1, layer2, layer3, avgpool, flatten, fc``.

    Args:
        blocks_per_stage: ``n``; the depth is ``6n + 2``.
        in_channels: Input image channels.
        num_classes: Number of outputs.
    """

    def __init__(self, *, blocks_per_stage: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, _STAGE_CHANNELS[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STAGE_CHANNELS[0])
        self.relu = nn.ReLU()
        width = _STAGE_CHANNELS[0]
        for index, channels in enumerate(_STAGE_CHANNELS, start=1):
            stride = 1 if index == 1 else 2
            blocks = [BasicBlock(width, channels, stride=stride)]
            blocks += [BasicBlock(channels, channels) for _ in range(blocks_per_stage - 1)]
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
            width = channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """He (fan-out) init for convs, BN scale 1 and shift 0, as in the paper."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(batch, in_channels, H, W)`` to ``(batch, num_classes)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def _build(blocks_per_stage: int, in_channels: int, num_classes: int) -> CifarResNet:
    require_positive(in_channels=in_channels, num_classes=num_classes)
    return CifarResNet(blocks_per_stage=blocks_per_stage, in_channels=in_channels, num_classes=num_classes)


def resnet20(*, in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    """ResNet-20 (n=3): 272,474 parameters for 3 input channels and 10 classes.

    Args:
        in_channels: Input image channels (1 for MNIST).
        num_classes: Number of outputs.

    Returns:
        The model, freshly initialised.

    Raises:
        ValueError: A size is not a positive integer.
    """
    return _build(3, in_channels, num_classes)


def resnet56(*, in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    """ResNet-56 (n=9): 855,770 parameters for 3 input channels and 10 classes.

    Args:
        in_channels: Input image channels (1 for MNIST).
        num_classes: Number of outputs.

    Returns:
        The model, freshly initialised.

    Raises:
        ValueError: A size is not a positive integer.
    """
    return _build(9, in_channels, num_classes)
