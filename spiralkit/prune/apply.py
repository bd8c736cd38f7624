"""Carrying out a structured-pruning plan: masking or physically removing what it drops.

`apply_plan` either zeroes what a `PrunePlan` drops (``mode="mask"``, shapes unchanged) or
deletes it (``mode="remove"``, a physically smaller model); both act on the same entries, so
the masked model and its pruned twin compute the same function. `replay_plans` rebuilds the
architecture of a pruned model from the original by applying its plans in order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from torch import nn

from spiralkit.errors import PruneError
from spiralkit.graph.attention import HeadGroup, mask_heads, remove_heads
from spiralkit.graph.blocks import remove_blocks
from spiralkit.graph.groups import channel_size
from spiralkit.graph.slicing import Cutter, LayerEdit, Mode, edit_layer
from spiralkit.prune.plan import PrunePlan

__all__ = ["apply_plan", "replay_plans"]


def _layer(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise PruneError(f"plan does not fit the model: it has no layer {name!r}") from exc


def _edits(model: nn.Module, plan: PrunePlan) -> dict[str, LayerEdit]:
    """Per layer, the kept outputs and inputs; checks that the plan fits the model."""
    sides: dict[str, dict[str, tuple[int, ...]]] = defaultdict(dict)
    for group in plan.groups:
        for member in group.members:
            module = _layer(model, member.module)
            size = channel_size(module, member.role)
            if size != member.size:
                raise PruneError(
                    f"plan does not fit the model: {member.module!r} ({type(module).__name__}) has {size} "
                    f"{'output' if member.role == 'out' else 'input'} channels, the plan expects {member.size} "
                    "(was the plan already applied in remove mode?)"
                )
            if len(member.keep) < member.size:
                # A layer after a concatenation is in several groups; each plan member keeps
                # the indices of the other groups, so the layer keeps the intersection.
                previous = sides[member.module].get(member.role)
                kept = member.keep if previous is None else tuple(sorted(set(previous) & set(member.keep)))
                sides[member.module][member.role] = kept
    return {name: LayerEdit(out=s.get("out"), inp=s.get("in")) for name, s in sides.items() if s}


def apply_plan(model: nn.Module, plan: PrunePlan, *, mode: Mode) -> nn.Module:
    """Carry out ``plan`` on ``model`` in place.

    Args:
        model: A model with the architecture the plan was made for (a fresh copy works).
        plan: The plan.
        mode: ``"mask"`` zeroes every entry that removal would delete (shapes unchanged);
            ``"remove"`` deletes them, making the model physically smaller. Removed blocks
            are deleted in both modes (a block has no zero-equivalent in general).

    Returns:
        ``model`` (the same object). Parameters are new tensors in remove mode, so build
        optimizers afterwards.

    Raises:
        PruneError: Unknown mode, or the plan does not fit the model (a layer is missing or
            has a different size — e.g. the plan was already applied in remove mode).
    """
    if mode not in ("mask", "remove"):
        raise PruneError(f"mode must be 'mask' or 'remove', got {mode!r}")
    edits = _edits(model, plan)
    cutter = Cutter(mode)
    for name, edit in edits.items():
        edit_layer(model.get_submodule(name), edit, cutter)
    for head in plan.heads:
        group = HeadGroup(module=head.module, kind=head.kind, num_heads=head.num_heads, head_dim=head.head_dim)
        _layer(model, head.module)
        (mask_heads if mode == "mask" else remove_heads)(model, group, head.keep)
    if plan.blocks:
        for block in plan.blocks:
            _layer(model, block.module)
        remove_blocks(model, [b.module for b in plan.blocks])
    return model


def replay_plans(model: nn.Module, plans: Iterable[PrunePlan]) -> nn.Module:
    """Apply ``plans`` in order with ``mode="remove"``: the architecture of a pruned model, from the original."""
    for plan in plans:
        apply_plan(model, plan, mode="remove")
    return model
