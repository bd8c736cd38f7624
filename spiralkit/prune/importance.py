"""Importance criteria for unstructured pruning: one score per weight, low is pruned first.

Criteria are typed configs (``Magnitude``, ``Random``, ``Taylor``), each one class whose
`weight_scores` method scores weights (and whose `structure_scores` scores channels and heads:
these three are also criteria of structured pruning). `WEIGHT_CRITERIA` is the table a
recipe's ``criterion`` is typed from; :func:`score_weights` calls the criterion's method.
The one-shot calibration methods ``Wanda`` and ``SparseGPT`` (`spiralkit.prune.calibrated`)
are in the table too: they prune layer by layer themselves (``prune_layers``).
Each criterion is also a plain function usable alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import islice
from typing import Annotated, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from spiralkit.configs import KindTable, by_kind
from spiralkit.errors import PruneError
from spiralkit.graph.groups import ModelGroups
from spiralkit.prune.calibrated import SparseGPT, Wanda
from spiralkit.prune.channel_scoring import (
    Batch,
    LossFn,
    StructureScores,
    norm_scores,
    random_structure_scores,
    taylor_structure_scores,
)

Scores = dict[str, Tensor]


@runtime_checkable
class WeightCriterion(Protocol):
    """A criterion that scores single weights: a config with a ``kind`` and `weight_scores`."""

    kind: str

    def weight_scores(
        self,
        *,
        model: nn.Module,
        weights: Mapping[str, nn.Parameter],
        batches: Iterable[tuple[Tensor, Tensor]],
        loss_fn: LossFn | None,
    ) -> Scores:
        """One score per weight of each of ``weights`` (see `score_weights`)."""
        ...


class Magnitude(BaseModel):
    """``|w|`` (L1) or ``w²`` (L2): small weights matter least (Han et al. 2015).

    Of a channel or head: ``(Σ |w|^p)^(1/p)`` over the weights that compute it (Li et al. 2017).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["magnitude"] = "magnitude"
    norm: Literal[1, 2] = 1

    def weight_scores(self, *, model: nn.Module, weights: Mapping[str, nn.Parameter],
                      batches: Iterable[tuple[Tensor, Tensor]], loss_fn: LossFn | None) -> Scores:
        """`magnitude_scores` of ``weights``."""
        return magnitude_scores(weights, norm=self.norm)

    def structure_scores(self, *, model: nn.Module, groups: ModelGroups, inputs: Sequence[Batch],
                         batches: Iterable[tuple[Batch, Tensor]], loss_fn: LossFn | None) -> StructureScores:
        """`norm_scores` of every channel and head."""
        return norm_scores(model, groups, self.norm)


class Random(BaseModel):
    """Uniform random scores: the control every criterion should beat."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["random"] = "random"
    seed: int = 0

    def weight_scores(self, *, model: nn.Module, weights: Mapping[str, nn.Parameter],
                      batches: Iterable[tuple[Tensor, Tensor]], loss_fn: LossFn | None) -> Scores:
        """`random_scores` of ``weights``."""
        return random_scores(weights, seed=self.seed)

    def structure_scores(self, *, model: nn.Module, groups: ModelGroups, inputs: Sequence[Batch],
                         batches: Iterable[tuple[Batch, Tensor]], loss_fn: LossFn | None) -> StructureScores:
        """`random_structure_scores` of every channel and head."""
        return random_structure_scores(groups, seed=self.seed)


class Taylor(BaseModel):
    """First-order Taylor saliency ``|w · ∂L/∂w|`` (Molchanov et al. 2017).

    The gradient is summed over ``batches`` training batches before scoring.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["taylor"] = "taylor"
    batches: int = Field(default=8, gt=0)

    def weight_scores(self, *, model: nn.Module, weights: Mapping[str, nn.Parameter],
                      batches: Iterable[tuple[Tensor, Tensor]], loss_fn: LossFn | None) -> Scores:
        """`taylor_scores` of ``weights`` over the first ``self.batches`` batches."""
        if loss_fn is None:
            raise PruneError("taylor importance needs a loss function")
        return taylor_scores(model, weights, islice(batches, self.batches), loss_fn=loss_fn)

    def structure_scores(self, *, model: nn.Module, groups: ModelGroups, inputs: Sequence[Batch],
                         batches: Iterable[tuple[Batch, Tensor]], loss_fn: LossFn | None) -> StructureScores:
        """`taylor_structure_scores` over the first ``self.batches`` batches (Molchanov et al. 2019)."""
        if loss_fn is None:
            raise PruneError("taylor importance needs a loss function (loss_fn)")
        return taylor_structure_scores(model, groups, islice(batches, self.batches), loss_fn=loss_fn)


WEIGHT_CRITERIA: dict[str, type[BaseModel]] = by_kind(Magnitude, Random, Taylor, Wanda, SparseGPT)
"""The criteria of unstructured pruning, by ``kind``: a new one is a class with `weight_scores` and a line here."""

Criterion = Annotated[WeightCriterion, KindTable(WEIGHT_CRITERIA, what="pruning criterion")]
"""A recipe field holding one of the `WEIGHT_CRITERIA`, chosen by its ``kind`` (or named alone)."""


def magnitude_scores(weights: Mapping[str, Tensor], *, norm: int = 1) -> Scores:
    """Score each weight by ``|w|`` (norm 1) or ``w²`` (norm 2)."""
    return {name: w.detach().abs().pow(norm) for name, w in weights.items()}


def random_scores(weights: Mapping[str, Tensor], *, seed: int) -> Scores:
    """Score each weight uniformly at random (deterministic for a seed).

    Drawn from numpy's PCG64, not torch's generator: a model initialised after
    ``torch.manual_seed(s)`` took its weights from torch's stream for ``s``, and random
    scores from the same stream would then rank exactly like the weights themselves.
    """
    rng = np.random.default_rng(seed)
    return {name: torch.from_numpy(rng.random(tuple(w.shape), dtype=np.float32)) for name, w in weights.items()}


def taylor_scores(
    model: nn.Module,
    weights: Mapping[str, nn.Parameter],
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    loss_fn: LossFn,
) -> Scores:
    """Score each weight by ``|w · Σ_b ∂L_b/∂w|`` over the given batches.

    Args:
        model: the model the weights belong to; its train/eval mode is kept.
        weights: the parameters to score, by name.
        batches: ``(x, y)`` batches; all of them are used.
        loss_fn: ``loss_fn(outputs, y)`` giving a scalar loss.

    Raises:
        PruneError: no batch was given.
    """
    grads = {name: torch.zeros_like(w) for name, w in weights.items()}
    seen = 0
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        for name, w in weights.items():
            if w.grad is not None:
                grads[name] += w.grad
        seen += 1
    model.zero_grad(set_to_none=True)
    if seen == 0:
        raise PruneError("taylor importance needs at least one data batch; the loader is empty")
    return {name: (w.detach() * grads[name]).abs() for name, w in weights.items()}


def score_weights(
    criterion: object,
    *,
    model: nn.Module,
    weights: Mapping[str, nn.Parameter],
    batches: Iterable[tuple[Tensor, Tensor]] = (),
    loss_fn: LossFn | None = None,
) -> Scores:
    """Score ``weights`` with ``criterion`` (its `WeightCriterion.weight_scores`).

    Raises:
        PruneError: ``criterion`` cannot score weights, or lacks the data or loss it needs.
    """
    if not isinstance(criterion, WeightCriterion):
        raise PruneError(f"unknown pruning criterion {type(criterion).__name__}")
    return criterion.weight_scores(model=model, weights=weights, batches=batches, loss_fn=loss_fn)
