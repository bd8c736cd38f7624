"""The unstructured pruning step as a typed config, and the verbs that carry it out."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from spiralkit.prune.calibrated import CalibratedCriterion
from spiralkit.prune.importance import Criterion, LossFn, Magnitude, score_weights
from spiralkit.prune.nm import NM, nm_keep_mask
from spiralkit.prune.schedules import AGP, OneShot, Schedule
from spiralkit.prune.selectors import Selector, selected_weights
from spiralkit.prune.unstructured import Masks, Scope, apply_masks, masks_for_sparsity


class UnstructuredPrune(BaseModel):
    """Weight pruning: which layers, by which criterion, how far, on which schedule.

    Attributes:
        criterion: importance of each weight (magnitude, random, taylor), or a one-shot
            calibration method that prunes layer by layer from calibration data (wanda,
            sparsegpt; see `spiralkit.prune.calibrated`), which compares weights within a
            row (wanda) or a block of columns (sparsegpt): ``scope`` does not apply to them.
        scope: ``global`` ranks all selected weights together; ``layerwise`` prunes each
            layer to the same sparsity. Not used with a ``pattern`` or a calibration method
            (their comparison groups are rows, blocks or N:M groups).
        include: module name patterns to prune (fnmatch).
        exclude: module name patterns to leave dense.
        target_sparsity: final fraction of the selected weights that are zero; with a
            ``pattern`` it is ``1 − n/m`` (and may be left out).
        schedule: how the spiral approaches the target; with a ``pattern``, one-shot (the
            pattern is reached in one step).
        pattern: N:M semi-structured sparsity (``{n: 2, m: 4}``): in every ``m`` consecutive
            input weights of a row, the ``n`` best by the criterion are kept (``scope`` does
            not apply). None (the default): unstructured.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["unstructured"] = "unstructured"
    criterion: Criterion = Magnitude()
    scope: Scope = Scope.GLOBAL
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    target_sparsity: float = Field(gt=0, lt=1)
    schedule: Schedule = AGP(rounds=5)
    pattern: NM | None = None

    @model_validator(mode="before")
    @classmethod
    def _pattern_defaults(cls, data: Any) -> Any:
        # An N:M step has one sparsity and is taken at once: fill in what the pattern decides.
        if isinstance(data, dict) and data.get("pattern") is not None:
            pattern = data["pattern"]
            n, m = (pattern.n, pattern.m) if isinstance(pattern, NM) else (pattern.get("n"), pattern.get("m")) \
                if isinstance(pattern, dict) else (None, None)
            if isinstance(n, int) and isinstance(m, int) and 0 < n < m:
                data = {"target_sparsity": 1.0 - n / m, **data}
            data = {"schedule": OneShot(), **data}
        return data

    @model_validator(mode="after")
    def _pattern_fits(self) -> UnstructuredPrune:
        if self.pattern is not None:
            if abs(self.target_sparsity - self.pattern.sparsity) > 1e-9:
                raise ValueError(f"target_sparsity {self.target_sparsity} contradicts pattern {self.pattern}, "
                                 f"which prunes {self.pattern.sparsity:g}; leave target_sparsity out")
            if not isinstance(self.schedule, OneShot):
                raise ValueError(f"pattern {self.pattern} is reached in one step: schedule must be one-shot "
                                 f"(got {self.schedule.kind!r}); leave schedule out")
        return self

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
        batches: training batches, for data-driven criteria (taylor) and the calibration
            data of one-shot calibration methods (wanda, sparsegpt).
        loss_fn: ``loss_fn(outputs, targets)``, for data-driven criteria.
    """
    weights = selected_weights(model, config.selector)
    if isinstance(config.criterion, CalibratedCriterion):  # prunes (and updates) layer by layer itself
        masks = config.criterion.prune_layers(model, weights, batches=batches, sparsity=sparsity,
                                              pattern=config.pattern, existing=existing)
    else:
        scores = score_weights(config.criterion, model=model, weights=weights, batches=batches, loss_fn=loss_fn)
        if config.pattern is not None:
            masks = _nm_masks(scores, config.pattern, existing=existing)
        else:
            masks = masks_for_sparsity(scores, sparsity=sparsity, scope=config.scope, existing=existing)
    apply_masks(model, masks)
    return masks


def _nm_masks(scores: dict[str, Tensor], pattern: NM, *, existing: Masks | None) -> Masks:
    """N:M keep-masks of scored weights (viewed as ``(out, in)``); what ``existing`` pruned stays pruned."""
    masks: Masks = {}
    for name, score in scores.items():
        matrix = score.float().reshape(score.shape[0], -1)
        earlier = existing.get(name) if existing else None
        if earlier is not None:
            matrix = matrix.masked_fill(~earlier.reshape(matrix.shape), float("-inf"))
        keep = nm_keep_mask(matrix, pattern, name=name.removesuffix(".weight"))
        if earlier is not None:
            keep &= earlier.reshape(matrix.shape)
        masks[name] = keep.reshape(score.shape)
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
