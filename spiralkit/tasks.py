"""What "good" means for a model: the task's metric and its training loss.

A task is a small typed config; :func:`evaluate` dispatches on its type. Metrics are
reported in the units users quote: classification accuracy in percent.
"""

from __future__ import annotations

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


Task = Annotated[Classification, Field(discriminator="kind"), BeforeValidator(kind_from_string)]


@dataclass(frozen=True)
class Evaluation:
    """A task metric and the mean loss on one data split."""

    metric: float
    loss: float
    examples: int


def metric_drop(task: Classification, *, baseline: float, value: float) -> float:
    """How much worse ``value`` is than ``baseline`` (positive = worse), whatever the metric's direction."""
    return baseline - value if task.higher_is_better else value - baseline


@singledispatch
def evaluate(task: object, model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]]) -> Evaluation:
    """Evaluate ``model`` on ``loader`` for ``task`` (eval mode, no gradients)."""
    raise SpiralError(f"unknown task {type(task).__name__}")


@evaluate.register
def _(task: Classification, model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]]) -> Evaluation:
    was_training = model.training
    model.eval()
    correct = 0
    total = 0
    loss_sum = 0.0
    with torch.inference_mode():
        for x, y in loader:
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            top = logits.topk(min(task.top_k, logits.shape[-1]), dim=-1).indices
            correct += int((top == y.unsqueeze(-1)).any(dim=-1).sum())
            total += y.shape[0]
    model.train(was_training)
    if total == 0:
        raise SpiralError("cannot evaluate on an empty data split")
    return Evaluation(metric=100.0 * correct / total, loss=loss_sum / total, examples=total)
