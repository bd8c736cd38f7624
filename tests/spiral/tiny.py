"""A recipe small enough to run in seconds: an MLP on the scikit-learn digits, one pruning round."""

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
