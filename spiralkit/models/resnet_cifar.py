"""CIFAR ResNets of He et al. (2016) "Deep Residual Learning for Image Recognition", §4.2.

A 3x3 stem conv (16 channels), then three stages of ``n`` BasicBlocks with 16, 32 and 64
channels (stride 2 at the start of stages 2 and 3), global average pooling and a linear
classifier: depth ``6n + 2`` (ResNet-20: n=3, ResNet-56: n=9). Global average pooling makes
the nets work on any input size, e.g. 28x28 MNIST with ``in_channels=1``.

Two shortcuts where a block changes the shape:

- ``resnet20`` / ``resnet56`` (`CifarResNet`): a 1x1 conv + BatchNorm projection (the
  paper's option B), trained here from scratch.
- ``cifar_resnet20/32/44/56`` (`CifarResNetA`): the paper's parameter-free option A as in
  the public pretrained checkpoints of akamaster/pytorch_resnet_cifar10 — the input
  subsampled by 2 and zero-padded with ``planes // 4`` channels on each side. It is written
  as a `ChannelPadShortcut`, a channel map whose index buffer structured pruning can edit,
  so the residual stream of these nets is prunable like any other channel group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spiralkit.models.mlp import require_positive

__all__ = [
    "BasicBlock",
    "ChannelPadShortcut",
    "CifarResNet",
    "CifarResNetA",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "resnet20",
    "resnet56",
]

_STAGE_CHANNELS = (16, 32, 64)

# (in_channels, out_channels, stride) → the shortcut of a block that changes the shape.
ShortcutFactory = Callable[[int, int, int], nn.Module]


class ChannelPadShortcut(nn.Module):
    """A parameter-free channel map: ``out[:, j] = x[:, index[j], ::stride, ::stride]``, or 0 where ``index[j] = -1``.

    Option A of He et al. (2016) is the map ``index = [-1]*p + [0, 1, …, C−1] + [-1]*p`` with
    ``p = planes // 4`` (akamaster's ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))``). Holding
    the map as data instead of a pad width is what makes the residual stream prunable:
    removing input channels or output channels only edits ``index`` (see
    `spiralkit.graph.slicing`), and any map computes the same function as its masked twin.

    ``index`` is a non-persistent buffer: it is architecture, not weights — pretrained
    checkpoints do not hold it, and a pruned model rebuilds it by replaying its plans.

    Args:
        index: For each output channel, the input channel it copies, or -1 for zeros.
        in_channels: Number of input channels.
        stride: Spatial subsampling (every ``stride``-th row and column, from the first).

    Raises:
        ValueError: ``in_channels`` or ``stride`` is not positive, or ``index`` is empty,
            not whole numbers, or names a channel outside ``[-1, in_channels)``.
    """

    index: Tensor

    def __init__(self, index: Sequence[int] | Tensor, *, in_channels: int, stride: int = 2) -> None:
        super().__init__()
        require_positive(in_channels=in_channels, stride=stride)
        values = torch.as_tensor(index)
        if values.dim() != 1 or values.numel() == 0 or values.is_floating_point() or values.is_complex():
            raise ValueError(f"index must be a non-empty 1-D sequence of integers, got {values.dtype} of shape {tuple(values.shape)}")
        values = values.long()
        bad = values[(values < -1) | (values >= in_channels)]
        if bad.numel():
            raise ValueError(f"index entry {int(bad[0])} is outside [-1, {in_channels}) (in_channels={in_channels})")
        self.in_channels = in_channels
        self.stride = stride
        self.register_buffer("index", values, persistent=False)

    @classmethod
    def option_a(cls, in_channels: int, out_channels: int, stride: int) -> ChannelPadShortcut:
        """The option-A shortcut: ``out_channels // 4`` zero channels, the inputs, as many zeros again.

        Args:
            in_channels: Input channels.
            out_channels: Output channels; must equal ``in_channels + 2 * (out_channels // 4)``.
            stride: Spatial subsampling.

        Raises:
            ValueError: The channel counts do not fit option A's padding.
        """
        pad = out_channels // 4
        if in_channels + 2 * pad != out_channels:
            raise ValueError(
                f"option A pads {pad} zero channels on each side of {in_channels} inputs, which gives "
                f"{in_channels + 2 * pad}, not {out_channels} channels")
        return cls([-1] * pad + list(range(in_channels)) + [-1] * pad, in_channels=in_channels, stride=stride)

    @property
    def out_channels(self) -> int:
        """Number of output channels (``len(index)``)."""
        return int(self.index.numel())

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(batch, in_channels, H, W)`` to ``(batch, out_channels, ⌈H/stride⌉, ⌈W/stride⌉)``."""
        x = x[:, :, :: self.stride, :: self.stride]
        # One zero channel appended at position in_channels is what index -1 gathers: a Pad and
        # a Gather, which ONNX exports and runtimes run as they are.
        padded = F.pad(x, (0, 0, 0, 0, 0, 1))
        return padded.index_select(1, torch.where(self.index < 0, self.in_channels, self.index))

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, stride={self.stride}"


def projection_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Option B: a strided 1x1 convolution and a BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """``conv1 → bn1 → relu1 → conv2 → bn2 (+ shortcut) → relu2``.

    The two ReLUs are separate modules so a forward hook on either fires once per call.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of ``conv1`` (and of the shortcut).
        shortcut: Builds the shortcut (``downsample``) where the block changes the shape;
            the identity elsewhere.
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, stride: int = 1, shortcut: ShortcutFactory = projection_shortcut
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = shortcut(in_channels, out_channels, stride)

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

    # What the option-A subclass changes: the shortcut where the shape changes, the classifier's name.
    shortcut: ClassVar[ShortcutFactory] = staticmethod(projection_shortcut)
    classifier: ClassVar[str] = "fc"

    def __init__(self, *, blocks_per_stage: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, _STAGE_CHANNELS[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STAGE_CHANNELS[0])
        self.relu = nn.ReLU()
        width = _add_stages(self, blocks_per_stage, type(self).shortcut)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.add_module(self.classifier, nn.Linear(width, num_classes))
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(batch, in_channels, H, W)`` to ``(batch, num_classes)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return getattr(self, self.classifier)(self.flatten(self.avgpool(x)))


class CifarResNetA(CifarResNet):
    """The option-A CIFAR ResNet with akamaster's names, so that its pretrained checkpoints load.

    Module names: ``conv1, bn1, relu, layer1, layer2, layer3, avgpool, flatten, linear``;
    each block has ``conv1, bn1, conv2, bn2`` and, where the shape changes, a
    `ChannelPadShortcut` as ``downsample`` (no parameters, so checkpoints never name it).
    Arguments as `CifarResNet`.
    """

    shortcut: ClassVar[ShortcutFactory] = ChannelPadShortcut.option_a
    classifier: ClassVar[str] = "linear"


def _add_stages(model: nn.Module, blocks_per_stage: int, shortcut: ShortcutFactory) -> int:
    """Add ``layer1..3`` of ``blocks_per_stage`` BasicBlocks to ``model``; returns the last width."""
    width = _STAGE_CHANNELS[0]
    for index, channels in enumerate(_STAGE_CHANNELS, start=1):
        stride = 1 if index == 1 else 2
        blocks = [BasicBlock(width, channels, stride=stride, shortcut=shortcut)]
        blocks += [BasicBlock(channels, channels, shortcut=shortcut) for _ in range(blocks_per_stage - 1)]
        model.add_module(f"layer{index}", nn.Sequential(*blocks))
        width = channels
    return width


def _init_weights(model: nn.Module) -> None:
    """He (fan-out) init for convs, BN scale 1 and shift 0, as in the paper."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


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


def _build_a(blocks_per_stage: int, in_channels: int, num_classes: int) -> CifarResNetA:
    require_positive(in_channels=in_channels, num_classes=num_classes)
    return CifarResNetA(blocks_per_stage=blocks_per_stage, in_channels=in_channels, num_classes=num_classes)


def cifar_resnet20(*, in_channels: int = 3, num_classes: int = 10) -> CifarResNetA:
    """Option-A ResNet-20 (n=3, 269,722 parameters): loads ``cifar10_resnet20_akamaster.safetensors``.

    Args:
        in_channels: Input image channels (the checkpoint needs 3).
        num_classes: Number of outputs (the checkpoint needs 10).

    Returns:
        The model, freshly initialised (give the checkpoint in the model spec).

    Raises:
        ValueError: A size is not a positive integer.
    """
    return _build_a(3, in_channels, num_classes)


def cifar_resnet32(*, in_channels: int = 3, num_classes: int = 10) -> CifarResNetA:
    """Option-A ResNet-32 (n=5): loads ``cifar10_resnet32_akamaster.safetensors``; arguments as `cifar_resnet20`."""
    return _build_a(5, in_channels, num_classes)


def cifar_resnet44(*, in_channels: int = 3, num_classes: int = 10) -> CifarResNetA:
    """Option-A ResNet-44 (n=7): loads ``cifar10_resnet44_akamaster.safetensors``; arguments as `cifar_resnet20`."""
    return _build_a(7, in_channels, num_classes)


def cifar_resnet56(*, in_channels: int = 3, num_classes: int = 10) -> CifarResNetA:
    """Option-A ResNet-56 (n=9): loads ``cifar10_resnet56_akamaster.safetensors``; arguments as `cifar_resnet20`."""
    return _build_a(9, in_channels, num_classes)
