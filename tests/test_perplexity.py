"""The perplexity task: exp(mean NLL over all scored tokens), lower is better."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from spiralkit.errors import SpiralError
from spiralkit.spiral.recipe import parse_recipe
from spiralkit.tasks import Perplexity, evaluate, metric_drop


class FixedLogits(nn.Module):
    """Returns stored logits for each batch in turn (inputs ignored)."""

    def __init__(self, batches: list[Tensor]) -> None:
        super().__init__()
        self.batches = batches
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.batches[self.calls - 1]


def _data(seed: int = 0) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
    generator = torch.Generator().manual_seed(seed)
    sizes = [(3, 5), (1, 5)]  # uneven batches: per-token mean differs from the mean of batch means
    logits = [torch.randn(b, t, 7, generator=generator) * 3 for b, t in sizes]
    targets = [torch.randint(0, 7, (b, t), generator=generator) for b, t in sizes]
    return logits, [(torch.zeros(b, t, dtype=torch.long), y) for (b, t), y in zip(sizes, targets, strict=True)]


def test_perplexity_is_exp_of_the_mean_nll_over_all_tokens() -> None:
    logits, loader = _data()
    nll = [-torch.log_softmax(z.double(), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
           for z, (_, y) in zip(logits, loader, strict=True)]
    direct = torch.cat([n.reshape(-1) for n in nll]).mean().item()
    result = evaluate(Perplexity(), FixedLogits(logits), loader)
    assert result.loss == pytest.approx(direct, rel=1e-6)
    assert result.metric == pytest.approx(math.exp(direct), rel=1e-6)
    assert result.examples == 4
    batch_means = sum(n.mean().item() for n in nll) / 2
    assert abs(batch_means - direct) > 1e-3  # the check above would catch averaging batch means


def test_ignored_targets_are_not_scored() -> None:
    logits, loader = _data(seed=1)
    full = evaluate(Perplexity(), FixedLogits(logits), loader)
    masked = [(x, y.clone()) for x, y in loader]
    masked[0][1][0, :] = -100
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[0] = False
    nll0 = -torch.log_softmax(logits[0].double(), -1).gather(-1, loader[0][1].unsqueeze(-1)).squeeze(-1)
    nll1 = -torch.log_softmax(logits[1].double(), -1).gather(-1, loader[1][1].unsqueeze(-1)).squeeze(-1)
    direct = torch.cat([nll0[keep], nll1.reshape(-1)]).mean().item()
    result = evaluate(Perplexity(), FixedLogits(logits), masked)
    assert result.loss == pytest.approx(direct, rel=1e-6) and result.loss != pytest.approx(full.loss)


def test_the_training_loss_is_the_mean_next_token_cross_entropy() -> None:
    logits, loader = _data()
    y = loader[0][1]
    expected = -torch.log_softmax(logits[0], -1).gather(-1, y.unsqueeze(-1)).mean()
    assert Perplexity().loss(logits[0], y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_perfect_model_has_perplexity_one_and_a_uniform_one_the_vocabulary_size() -> None:
    y = torch.randint(0, 7, (2, 4))
    perfect = torch.nn.functional.one_hot(y, 7).float() * 100
    assert evaluate(Perplexity(), FixedLogits([perfect]), [(y, y)]).metric == pytest.approx(1.0)
    assert evaluate(Perplexity(), FixedLogits([torch.zeros(2, 4, 7)]), [(y, y)]).metric == pytest.approx(7.0)


def test_lower_is_better_in_metric_drop() -> None:
    task = Perplexity()
    assert not task.higher_is_better and task.metric_name == "perplexity"
    assert metric_drop(task, baseline=10.0, value=12.5) == pytest.approx(2.5)  # worse: positive drop
    assert metric_drop(task, baseline=10.0, value=9.0) == pytest.approx(-1.0)


def test_logits_that_do_not_fit_the_targets_are_refused_with_both_shapes() -> None:
    with pytest.raises(SpiralError, match=r"logits \(batch, seq, vocab\) .* got outputs \(2, 5, 7\) and targets \(2, 4\)"):
        Perplexity().loss(torch.zeros(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(SpiralError, match=r"got outputs \(2, 7\) and targets \(2, 7\)"):
        evaluate(Perplexity(), FixedLogits([torch.zeros(2, 7)]), [(torch.zeros(2), torch.zeros(2, 7, dtype=torch.long))])


def test_a_split_without_scored_tokens_is_an_error() -> None:
    y = torch.full((1, 3), -100)
    with pytest.raises(SpiralError, match="perplexity on a data split without scored tokens"):
        evaluate(Perplexity(), FixedLogits([torch.zeros(1, 3, 5)]), [(y, y)])


def test_a_recipe_names_the_task_by_its_kind() -> None:
    recipe = parse_recipe("model: {name: tiny_llama}\ndata: {name: tinystories}\ntask: perplexity\n")
    assert recipe.task == Perplexity()
