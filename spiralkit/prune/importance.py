"""Importance criteria for unstructured pruning: one score per weight, low is pruned first.

Criteria are typed configs (``Magnitude``, ``Random``, ``Taylor``); :func:`score_weights`
dispatches on the config's type. Each criterion is also a plain function usable alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import singledispatch
from itertools import islice
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from torch import Tensor, nn

from spiralkit.configs import kind_from_string
from spiralkit.errors import PruneError

Scores = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


class Magnitude(BaseModel):
    """``|w|`` (L1) or ``w²`` (L2): small weights matter least (Han et al. 2015)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["magnitude"] = "magnitude"
    norm: Literal[1, 2] = 1


class Random(BaseModel):
    """Uniform random scores: the control every criterion should beat."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["random"] = "random"
    seed: int = 0


class Taylor(BaseModel):
    """First-order Taylor saliency ``|w · ∂L/∂w|`` (Molchanov et al. 2017).

    The gradient is summed over ``batches`` training batches before scoring.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["taylor"] = "taylor"
    batches: int = Field(default=8, gt=0)


Criterion = Annotated[
    Magnitude | Random | Taylor, Field(discriminator="kind"), BeforeValidator(kind_from_string)
]


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


@singledispatch
def score_weights(
    criterion: object,
    *,
    model: nn.Module,
    weights: Mapping[str, nn.Parameter],
    batches: Iterable[tuple[Tensor, Tensor]] = (),
    loss_fn: LossFn | None = None,
) -> Scores:
    """Score ``weights`` with the criterion given by the config's type."""
    raise PruneError(f"unknown pruning criterion {type(criterion).__name__}")


@score_weights.register
def _(criterion: Magnitude, *, model, weights, batches=(), loss_fn=None) -> Scores:  # type: ignore[no-untyped-def]
    return magnitude_scores(weights, norm=criterion.norm)


@score_weights.register
def _(criterion: Random, *, model, weights, batches=(), loss_fn=None) -> Scores:  # type: ignore[no-untyped-def]
    return random_scores(weights, seed=criterion.seed)


@score_weights.register
def _(criterion: Taylor, *, model, weights, batches=(), loss_fn=None) -> Scores:  # type: ignore[no-untyped-def]
    if loss_fn is None:
        raise PruneError("taylor importance needs a loss function")
    return taylor_scores(model, weights, islice(batches, criterion.batches), loss_fn=loss_fn)
