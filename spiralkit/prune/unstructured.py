"""Unstructured (weight) pruning with masks that survive training.

A mask set is a plain ``dict[str, Tensor]`` from parameter name to a boolean keep-mask.
Masks are enforced without re-parametrising the model (so ``state_dict`` keys never
change): the gradient of a pruned weight is zeroed by a tensor hook, and an optimizer
step post-hook multiplies the weights by their masks again, so weight decay, momentum
or Adam's state can never revive a pruned weight. :func:`finalize` makes the zeros
permanent and removes that machinery.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from spiralkit.errors import PruneError

Masks = dict[str, Tensor]


class Scope(StrEnum):
    """How a sparsity target is shared among layers."""

    LAYERWISE = "layerwise"  # every layer pruned to the same sparsity
    GLOBAL = "global"  # one ranking over all layers; layers end with different sparsities


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise PruneError(f"sparsity must be in [0, 1), got {sparsity}")


def _prune_lowest(scores: Tensor, count: int) -> Tensor:
    """Keep-mask of ``scores``' shape with the ``count`` lowest entries pruned (stable ties)."""
    order = torch.argsort(scores.flatten(), stable=True)
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[order[:count]] = False
    return keep.view(scores.shape)


def _with_existing(scores: Mapping[str, Tensor], existing: Masks | None) -> dict[str, Tensor]:
    # Pruning is monotone: what an earlier round removed ranks below everything else.
    if existing is None:
        return {name: s.float() for name, s in scores.items()}
    return {
        name: s.float().masked_fill(~existing[name], float("-inf")) if name in existing else s.float()
        for name, s in scores.items()
    }


def masks_for_sparsity(
    scores: Mapping[str, Tensor],
    *,
    sparsity: float,
    scope: Scope = Scope.LAYERWISE,
    existing: Masks | None = None,
) -> Masks:
    """Keep-masks that prune the lowest-scored fraction ``sparsity`` of the weights.

    Args:
        scores: importance per weight, by parameter name.
        sparsity: fraction of the scored weights to prune, in [0, 1).
        scope: ``LAYERWISE`` prunes ``round(sparsity·n_l)`` weights in each layer;
            ``GLOBAL`` prunes ``round(sparsity·Σn_l)`` weights ranked across layers.
        existing: masks of earlier rounds; their pruned weights stay pruned.

    Returns:
        A boolean keep-mask per parameter name.
    """
    _check_sparsity(sparsity)
    ranked = _with_existing(scores, existing)
    if scope is Scope.LAYERWISE:
        return {
            name: _prune_lowest(s, round(sparsity * s.numel())) for name, s in ranked.items()
        }
    flat = torch.cat([s.flatten() for s in ranked.values()])
    keep = _prune_lowest(flat, round(sparsity * flat.numel()))
    masks: Masks = {}
    start = 0
    for name, s in ranked.items():
        masks[name] = keep[start : start + s.numel()].view(s.shape)
        start += s.numel()
    return masks


def masks_for_threshold(weights: Mapping[str, Tensor], *, alpha: float) -> Masks:
    """Keep weights with ``|w| > alpha · mean(|w|)`` of their own layer.

    The mean is over all of the layer's entries. ``alpha`` must be non-negative.
    """
    if alpha < 0:
        raise PruneError(f"threshold alpha must be >= 0, got {alpha}")
    return {name: w.detach().abs() > alpha * w.detach().abs().mean() for name, w in weights.items()}


def mask_sparsity(masks: Mapping[str, Tensor]) -> float:
    """Fraction of masked-out entries over all masks (0 when there are none)."""
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    return pruned / total if total else 0.0


def _parameters(model: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    missing = [name for name in masks if name not in params]
    if missing:
        raise PruneError(f"mask names no parameter of the model: {', '.join(missing[:5])}")
    for name, mask in masks.items():
        if mask.shape != params[name].shape:
            raise PruneError(
                f"mask for {name} has shape {tuple(mask.shape)}, "
                f"parameter has {tuple(params[name].shape)}"
            )
    return {name: params[name] for name in masks}


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Zero the masked-out weights in place."""
    with torch.no_grad():
        for name, param in _parameters(model, masks).items():
            # masked_fill, not multiply: w·0 leaves -0.0 where w was negative.
            param.masked_fill_(~masks[name], 0.0)


@dataclass
class MaskEnforcer:
    """Hooks that keep masked weights at exactly zero while a model trains.

    Use as a context manager or call :meth:`remove`.
    """

    handles: list[RemovableHandle] = field(default_factory=list)

    def remove(self) -> None:
        """Remove every hook this enforcer installed."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __enter__(self) -> MaskEnforcer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def enforce_masks(
    model: nn.Module, masks: Mapping[str, Tensor], optimizer: torch.optim.Optimizer | None = None
) -> MaskEnforcer:
    """Zero masked weights now and keep them zero through backward passes and optimizer steps.

    Args:
        model: the model holding the parameters named in ``masks``.
        masks: boolean keep-masks by parameter name.
        optimizer: when given, masks are re-applied after each of its steps, which
            also cancels weight decay or stale optimizer state on pruned weights.
    """
    params = _parameters(model, masks)
    apply_masks(model, masks)
    enforcer = MaskEnforcer()
    for name, param in params.items():
        keep = masks[name].to(param.dtype)
        enforcer.handles.append(param.register_hook(lambda grad, keep=keep: grad * keep))
    if optimizer is not None:

        def reapply(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            apply_masks(model, masks)

        enforcer.handles.append(optimizer.register_step_post_hook(reapply))
    return enforcer


def finalize(model: nn.Module, masks: Mapping[str, Tensor], enforcer: MaskEnforcer | None = None) -> nn.Module:
    """Make pruning permanent: zero the masked weights and remove the mask hooks.

    Returns the same model, now an ordinary module with zeros in its weights.
    """
    if enforcer is not None:
        enforcer.remove()
    apply_masks(model, masks)
    return model


def masks_from_zeros(weights: Mapping[str, Tensor]) -> Masks:
    """Recover keep-masks from a pruned model's zeros (e.g. a finalized checkpoint)."""
    return {name: w.detach() != 0 for name, w in weights.items()}
