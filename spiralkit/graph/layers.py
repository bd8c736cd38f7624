"""What spiralkit knows about layer types: their channel counts, and which ones couple in and out.

Shared by the Torch-Pruning glue (`spiralkit.graph.tp`), the op-safety rules
(`spiralkit.graph.rules`) and the group builder (`spiralkit.graph.groups`).
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from spiralkit.models.resnet_cifar import ChannelPadShortcut

__all__ = ["CHANNEL_MAPS", "COUPLED", "RNN_TYPES", "Role", "channel_size", "is_conv1d", "is_depthwise"]

Role = Literal["out", "in"]

RNN_TYPES: tuple[type[nn.Module], ...] = (nn.LSTM, nn.GRU, nn.RNN)
# Parameter-free layers that copy input channels to output channels through an index buffer.
# Their two sides are pruned independently: a removed input leaves a zero output channel,
# a removed output is one entry less; both only edit the index (see `slicing`).
CHANNEL_MAPS: tuple[type[nn.Module], ...] = (ChannelPadShortcut,)
# Layers whose input and output channels are the same channels (cut together).
COUPLED = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.PReLU, nn.Embedding,
           nn.LayerNorm, nn.GroupNorm)


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's ``Conv1D`` (GPT-2's linear layer, weight stored ``(in, out)``).

    Recognised by name and shape, so that spiralkit never imports transformers for it.
    """
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and type(module).__module__.startswith("transformers.")
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 2
        and hasattr(module, "nf")
        and hasattr(module, "nx")
    )


def channel_size(module: nn.Module, role: Role) -> int | None:
    """The number of channels of ``module`` on side ``role``, or None for an unknown layer."""
    if is_conv1d(module):
        return int(module.nf) if role == "out" else int(module.nx)  # type: ignore[arg-type]
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
    if isinstance(module, ChannelPadShortcut):
        return module.out_channels if role == "out" else module.in_channels
    return None


def is_depthwise(module: nn.Module) -> bool:
    """Whether ``module`` is a depthwise convolution (one group per channel, as many outputs as inputs)."""
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.in_channels == module.out_channels
