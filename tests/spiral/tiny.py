"""A recipe small enough to run in seconds: an MLP on the scikit-learn digits, one pruning round;
and a tiny transformer on the same digits (8 rows as 8 tokens), for attention heads and depth."""

from __future__ import annotations

import torch
from torch import Tensor, nn

TINY = """\
name: tiny
seed: 1
threads: 1
model: {name: mlp, kwargs: {in_features: 64, widths: [16]}}
data: {name: digits, batch_size: 64, val_fraction: 0.2}
train: {epochs: 1, optimizer: {name: adam, lr: 0.01}}
prune:
  target_sparsity: 0.5
  schedule: {kind: one-shot}
recover: {kind: finetune, train: {epochs: 1, optimizer: {name: sgd, lr: 0.05}}}
targets: {max_metric_drop: 50.0}
measure: {repeats: 2, warmup: 0}
"""


class DigitsTransformer(nn.Module):
    """A 2-layer transformer encoder (width 16, 4 heads) reading the 8x8 digits as 8 tokens of 8 pixels."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=32, dropout=0.0, batch_first=True),
            num_layers=layers, enable_nested_tensor=False,
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(x.reshape(x.shape[0], 8, 8))).mean(1))


def digits_transformer(layers: int = 2) -> nn.Module:
    """`DigitsTransformer` with fixed initial weights (seeded)."""
    torch.manual_seed(0)
    return DigitsTransformer(layers)


TINY_TRANSFORMER = TINY.replace("model: {name: mlp, kwargs: {in_features: 64, widths: [16]}}",
                                "model: {name: 'tests.spiral.tiny:digits_transformer'}").replace(
    "train: {epochs: 1, optimizer: {name: adam, lr: 0.01}}", "train: {epochs: 3, optimizer: {name: adam, lr: 0.01}}")
