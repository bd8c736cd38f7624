"""`detach_cached`: tensors a traced pass leaves in module attributes lose their graph, not their values."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from spiralkit.graph import trace_groups
from spiralkit.graph.forward import detach_cached


class CachingNet(nn.Module):
    """Caches a computed tensor in eval mode (as timm's LeViT caches attention biases)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)
        self.scale = nn.Parameter(torch.full((8,), 2.0))
        self.cache: dict[str, Tensor] = {}
        self.last: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            self.cache.setdefault("scale", self.scale * 1.0)
            self.last = [self.scale + 0.0]
        return self.fc2(torch.relu(self.fc1(x)) * self.cache.get("scale", self.scale))


def test_cached_tensors_are_detached_with_their_values() -> None:
    model = CachingNet().eval()
    with torch.enable_grad():
        model(torch.randn(1, 4))
    assert model.cache["scale"].grad_fn is not None  # what a traced pass leaves behind
    detach_cached(model)
    assert model.cache["scale"].grad_fn is None and model.last[0].grad_fn is None
    assert torch.equal(model.cache["scale"], torch.full((8,), 2.0))
    assert isinstance(model.scale, nn.Parameter) and model.scale.requires_grad  # parameters untouched
    copy.deepcopy(model)


def test_trace_groups_leaves_a_deep_copyable_model() -> None:
    model = CachingNet().eval()
    trace_groups(model, torch.randn(1, 4))
    twin = copy.deepcopy(model)
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))
