"""Tracing models into what structured pruning can cut: coupled channel groups, attention heads, blocks.

`trace_groups` is the entry point; `spiralkit.prune.structured` plans pruning on top of it
and `spiralkit.prune.apply` carries the plans out. Torch-Pruning is used behind
`spiralkit.graph.tp` only.
"""

from spiralkit.graph.attention import (
    HeadGroup,
    HeadPrunedMultiheadAttention,
    find_attention,
    mask_heads,
    remove_heads,
)
from spiralkit.graph.blocks import Block, find_blocks, remove_blocks
from spiralkit.graph.groups import (
    ChannelGroup,
    Member,
    ModelGroups,
    Skipped,
    call_model,
    channel_size,
    trace_groups,
)
from spiralkit.graph.slicing import Cutter, LayerEdit, Mode, edit_layer

__all__ = [
    "Block",
    "ChannelGroup",
    "Cutter",
    "HeadGroup",
    "HeadPrunedMultiheadAttention",
    "LayerEdit",
    "Member",
    "Mode",
    "ModelGroups",
    "Skipped",
    "call_model",
    "channel_size",
    "edit_layer",
    "find_attention",
    "find_blocks",
    "mask_heads",
    "remove_blocks",
    "remove_heads",
    "trace_groups",
]
