"""Small helpers over ``nn.Module`` shared by measurement, export and pruning."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def preserve_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's own train/eval flag on exit, whatever ran inside."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's own mode afterwards."""
    with preserve_modes(model):
        model.eval()
        yield


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode with gradients off: a teacher that never changes."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count to ``count`` (None or 0: leave it); restore it afterwards."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
