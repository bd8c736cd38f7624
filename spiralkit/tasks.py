"""What "good" means for a model: the task's metric and its training loss.

A task is a small typed config; :func:`evaluate` dispatches on its type. Metrics are
reported in the units users quote: classification accuracy in percent, embedding fidelity
as a mean cosine similarity (1 = the reference model's embeddings exactly), language-model
perplexity (lower is better).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import singledispatch
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from torch import Tensor, nn

from spiralkit.configs import kind_from_string
from spiralkit.errors import SpiralError
from spiralkit.modules import eval_mode


class Classification(BaseModel):
    """Top-k classification accuracy in percent; cross-entropy is the training loss."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["classification"] = "classification"
    top_k: int = Field(default=1, gt=0)

    @property
    def metric_name(self) -> str:
        """The name the report gives the metric."""
        return "accuracy" if self.top_k == 1 else f"top{self.top_k}_accuracy"

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger metric is better."""
        return True

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy of logits against class indices."""
        return F.cross_entropy(outputs, targets)


class EmbeddingFidelity(BaseModel):
    """How faithfully a model reproduces a reference model's sentence embeddings.

    The metric is the mean over examples of ``cos(e_model(x), e_reference(x))``: at most 1
    (identical directions), near 1 for a faithful compressed model; it can be negative only
    for embeddings that point away from the reference's. The reference is usually the
    uncompressed teacher, passed to `evaluate` as ``reference=``. The training loss is
    ``1 − cos`` to target embeddings (the reference's outputs on the same batch).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["fidelity"] = "fidelity"

    @property
    def metric_name(self) -> str:
        """The name the report gives the metric."""
        return "cosine_fidelity"

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger metric is better."""
        return True

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``mean(1 − cos(outputs, targets))`` over the batch; targets are embeddings, not labels.

        Raises:
            SpiralError: ``targets`` do not have the outputs' shape (e.g. class labels).
        """
        if outputs.shape != targets.shape:
            raise SpiralError(
                f"the fidelity loss compares embeddings with target embeddings of the same shape, got "
                f"outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)}; train it against the "
                "reference model's outputs (distillation), not the data set's labels"
            )
        return (1.0 - _row_cosine(outputs, targets)).mean()


class Perplexity(BaseModel):
    """Causal language modelling: perplexity of next-token predictions, lower is better.

    The model maps token ids ``(batch, seq)`` to logits ``(batch, seq, vocab)``; the targets
    are the next tokens ``(batch, seq)`` (`spiralkit.data.tinystories`). With ``N`` scored
    target tokens (those not equal to ``ignore_index``) and ``p(t_i)`` the model's softmax
    probability of target ``i``::

        NLL = −(1/N) Σ_i log p(t_i)        perplexity = exp(NLL)

    The training loss and the evaluation loss are ``NLL`` (next-token cross-entropy, in nats
    per token); evaluation averages over all tokens of the split, not over batch means.

    Attributes:
        ignore_index: Target value that is not scored (e.g. padding).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["perplexity"] = "perplexity"
    ignore_index: int = -100

    @property
    def metric_name(self) -> str:
        """The name the report gives the metric."""
        return "perplexity"

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger metric is better: no, lower perplexity is better."""
        return False

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy over the scored target tokens.

        Raises:
            SpiralError: ``outputs`` are not ``targets``' shape plus a vocabulary dimension.
        """
        _check_lm_shapes(outputs, targets)
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1),
                               ignore_index=self.ignore_index)


def _check_lm_shapes(outputs: Tensor, targets: Tensor) -> None:
    if outputs.dim() != targets.dim() + 1 or outputs.shape[:-1] != targets.shape:
        raise SpiralError(
            f"the perplexity task needs logits (batch, seq, vocab) and next-token targets (batch, seq), got "
            f"outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)}"
        )


AnyTask = Classification | EmbeddingFidelity | Perplexity
"""Every task config type."""

Task = Annotated[AnyTask, Field(discriminator="kind"), BeforeValidator(kind_from_string)]


@dataclass(frozen=True)
class Evaluation:
    """A task metric and the mean loss on one data split."""

    metric: float
    loss: float
    examples: int


def metric_drop(task: AnyTask, *, baseline: float, value: float) -> float:
    """How much worse ``value`` is than ``baseline`` (positive = worse), whatever the metric's direction."""
    return baseline - value if task.higher_is_better else value - baseline


_TIE = 1e-9
"""Relative slack of `within_tolerance`: far below any metric's resolution, far above float rounding."""


def within_tolerance(task: AnyTask, *, baseline: float, value: float, tolerance: float) -> bool:
    """Whether ``value`` is at most ``tolerance`` worse than ``baseline``; a drop equal to the
    tolerance is within it.

    Metrics are float ratios, so a drop that equals the tolerance exactly in examples need
    not in floats: 12 of 6,000 validation images are 0.2 points, but
    ``98.2333… − 98.0333…`` is ``0.2000000000000028``, which a plain ``drop <= 0.2`` rejects.
    The comparison allows ``1e-9`` (relative to the tolerance, at least absolute) for that rounding.
    """
    drop = metric_drop(task, baseline=baseline, value=value)
    return drop <= tolerance + _TIE * max(1.0, abs(tolerance))


@singledispatch
def evaluate(
    task: object,
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    reference: nn.Module | None = None,
) -> Evaluation:
    """Evaluate ``model`` on ``loader`` for ``task`` (eval mode, no gradients).

    Args:
        task: The task config; its type chooses the metric.
        model: The model to evaluate; its train/eval mode is restored afterwards.
        loader: ``(inputs, targets)`` batches.
        reference: The model to compare with, for tasks that measure agreement with one
            (`EmbeddingFidelity` requires it; `Classification` ignores it).

    Returns:
        The metric, the mean loss and the number of examples.

    Raises:
        SpiralError: Unknown task, an empty split, or a missing reference.
    """
    raise SpiralError(f"unknown task {type(task).__name__}")


@evaluate.register
def _(
    task: Classification,
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    reference: nn.Module | None = None,
) -> Evaluation:
    correct = 0
    total = 0
    loss_sum = 0.0
    with eval_mode(model), torch.inference_mode():
        for x, y in loader:
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            top = logits.topk(min(task.top_k, logits.shape[-1]), dim=-1).indices
            correct += int((top == y.unsqueeze(-1)).any(dim=-1).sum())
            total += y.shape[0]
    if total == 0:
        raise SpiralError("cannot evaluate on an empty data split")
    return Evaluation(metric=100.0 * correct / total, loss=loss_sum / total, examples=total)


@evaluate.register
def _(
    task: EmbeddingFidelity,
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    reference: nn.Module | None = None,
) -> Evaluation:
    if reference is None:
        raise SpiralError(
            "the fidelity task compares embeddings with a reference model: pass reference= "
            "(usually the uncompressed teacher) to evaluate"
        )
    cosine_sum = 0.0
    total = 0
    with eval_mode(model), eval_mode(reference), torch.inference_mode():
        for x, _ in loader:
            cosine_sum += float(_row_cosine(model(x), reference(x)).sum())
            total += x.shape[0]
    if total == 0:
        raise SpiralError("cannot evaluate on an empty data split")
    metric = cosine_sum / total
    return Evaluation(metric=metric, loss=1.0 - metric, examples=total)


def _row_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (flattened per example)."""
    if a.shape != b.shape:
        raise SpiralError(f"embeddings differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return F.cosine_similarity(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), dim=-1, eps=1e-12)


@evaluate.register
def _(
    task: Perplexity,
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    reference: nn.Module | None = None,
) -> Evaluation:
    nll_sum = 0.0
    tokens = 0
    sequences = 0
    with eval_mode(model), torch.inference_mode():
        for x, y in loader:
            logits = model(x)
            _check_lm_shapes(logits, y)
            nll_sum += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1),
                                             ignore_index=task.ignore_index, reduction="sum"))
            tokens += int((y != task.ignore_index).sum())
            sequences += y.shape[0]
    if tokens == 0:
        raise SpiralError("cannot evaluate perplexity on a data split without scored tokens")
    nll = nll_sum / tokens
    return Evaluation(metric=math.exp(nll), loss=nll, examples=sequences)
