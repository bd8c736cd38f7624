"""The unstructured pruning step as a typed config, and the verbs that carry it out."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from spiralkit.prune.importance import Criterion, LossFn, Magnitude, score_weights
from spiralkit.prune.schedules import AGP, Schedule
from spiralkit.prune.selectors import Selector, selected_weights
from spiralkit.prune.unstructured import Masks, Scope, apply_masks, masks_for_sparsity


class UnstructuredPrune(BaseModel):
    """Weight pruning: which layers, by which criterion, how far, on which schedule.

    Attributes:
        criterion: importance of each weight (magnitude, random, taylor).
        scope: ``global`` ranks all selected weights together; ``layerwise`` prunes each
            layer to the same sparsity.
        include: module name patterns to prune (fnmatch).
        exclude: module name patterns to leave dense.
        target_sparsity: final fraction of the selected weights that are zero.
        schedule: how the spiral approaches the target.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["unstructured"] = "unstructured"
    criterion: Criterion = Magnitude()
    scope: Scope = Scope.GLOBAL
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    target_sparsity: float = Field(gt=0, lt=1)
    schedule: Schedule = AGP(rounds=5)

    @property
    def selector(self) -> Selector:
        """The layers this step prunes."""
        return Selector(include=self.include, exclude=self.exclude)


def prune_to(
    model: nn.Module,
    config: UnstructuredPrune,
    *,
    sparsity: float,
    existing: Masks | None = None,
    batches: Iterable[tuple[Tensor, Tensor]] = (),
    loss_fn: LossFn | None = None,
) -> Masks:
    """Prune the selected weights of ``model`` to ``sparsity`` in place and return the masks.

    Args:
        model: the model to prune (weights are zeroed in place).
        config: the pruning step.
        sparsity: fraction of the selected weights to zero.
        existing: masks from earlier rounds; what they pruned stays pruned.
        batches: training batches, for data-driven criteria (taylor).
        loss_fn: ``loss_fn(outputs, targets)``, for data-driven criteria.
    """
    weights = selected_weights(model, config.selector)
    scores = score_weights(config.criterion, model=model, weights=weights, batches=batches, loss_fn=loss_fn)
    masks = masks_for_sparsity(scores, sparsity=sparsity, scope=config.scope, existing=existing)
    apply_masks(model, masks)
    return masks


def prune(
    model: nn.Module,
    config: UnstructuredPrune,
    *,
    batches: Iterable[tuple[Tensor, Tensor]] = (),
    loss_fn: LossFn | None = None,
) -> Masks:
    """One-shot: prune ``model`` straight to ``config.target_sparsity`` and return the masks."""
    return prune_to(model, config, sparsity=config.target_sparsity, batches=batches, loss_fn=loss_fn)
