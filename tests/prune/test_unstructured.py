"""Unstructured pruning: masks by hand, global vs layer-wise, masks through training, finalize."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spiralkit.errors import PruneError
from spiralkit.prune import (
    Magnitude,
    Random,
    Scope,
    Selector,
    Taylor,
    UnstructuredPrune,
    enforce_masks,
    finalize,
    magnitude_scores,
    mask_sparsity,
    masks_for_sparsity,
    masks_for_threshold,
    prune,
    selected_weights,
)


def tiny() -> nn.Sequential:
    """Two linear layers with weights chosen so global and layer-wise rankings differ."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.1, -0.4], [0.3, 0.2]]))
        model[1].weight.copy_(torch.tensor([[0.01, -0.02]]))
    return model


def test_layerwise_masks_match_hand_computed() -> None:
    scores = magnitude_scores(selected_weights(tiny(), Selector()))
    masks = masks_for_sparsity(scores, sparsity=0.5, scope=Scope.LAYERWISE)
    assert masks["0.weight"].tolist() == [[False, True], [True, False]]
    assert masks["1.weight"].tolist() == [[False, True]]


def test_global_masks_match_hand_computed() -> None:
    scores = magnitude_scores(selected_weights(tiny(), Selector()))
    masks = masks_for_sparsity(scores, sparsity=0.5, scope=Scope.GLOBAL)
    # The three smallest of all six magnitudes are 0.01, 0.02 and 0.1.
    assert masks["0.weight"].tolist() == [[False, True], [True, True]]
    assert masks["1.weight"].tolist() == [[False, False]]
    assert mask_sparsity(masks) == pytest.approx(0.5)


def test_existing_masks_stay_pruned() -> None:
    model = tiny()
    weights = selected_weights(model, Selector())
    first = masks_for_sparsity(magnitude_scores(weights), sparsity=1 / 3, scope=Scope.GLOBAL)
    # Random scores could rank a pruned weight high; the earlier mask must win.
    second = masks_for_sparsity(
        {n: torch.rand(w.shape) for n, w in weights.items()}, sparsity=2 / 3, scope=Scope.GLOBAL, existing=first
    )
    for name in first:
        assert not (second[name] & ~first[name]).any()
    assert mask_sparsity(second) == pytest.approx(2 / 3)


def test_threshold_masks() -> None:
    weights = {"w": torch.tensor([1.0, -2.0, 3.0, 6.0])}  # mean |w| = 3
    assert masks_for_threshold(weights, alpha=1.0)["w"].tolist() == [False, False, False, True]
    assert masks_for_threshold(weights, alpha=0.5)["w"].tolist() == [False, True, True, True]
    with pytest.raises(PruneError, match="alpha"):
        masks_for_threshold(weights, alpha=-1)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=0.1),
        lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.5),
    ],
    ids=["sgd-momentum-wd", "adam", "adamw"],
)
def test_masked_weights_stay_zero_through_optimizer_steps(make_optimizer) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    masks = prune(model, UnstructuredPrune(target_sparsity=0.6))
    optimizer = make_optimizer(model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with enforce_masks(model, masks, optimizer):
        for _ in range(20):
            loss = model(torch.randn(32, 8)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        assert torch.equal(params[name][~keep], torch.zeros(int((~keep).sum())))
        assert not torch.equal(params[name][keep], before[name][keep]), "kept weights must train"


def test_finalize_removes_hooks() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    masks = prune(model, UnstructuredPrune(target_sparsity=0.5))
    enforcer = enforce_masks(model, masks)
    finalize(model, masks, enforcer)
    model(torch.randn(3, 4)).sum().backward()
    grad = model[0].weight.grad
    assert grad is not None and (grad[~masks["0.weight"]] != 0).any(), "gradient hooks must be gone"
    assert (model[0].weight[~masks["0.weight"]] == 0).all()
    assert list(model.state_dict()) == ["0.weight", "0.bias"], "state_dict keys never change"


def test_selector_exclude_and_bad_pattern() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    assert list(Selector(exclude=("1",)).select(model)) == ["0"]
    with pytest.raises(PruneError, match=r"pattern 'fc9' matches no prunable layer; prunable layers are: 0, 1"):
        Selector(exclude=("fc9",)).select(model)
    with pytest.raises(PruneError, match="excludes every prunable layer"):
        Selector(exclude=("*",)).select(model)


def test_random_criterion_is_seeded_and_taylor_needs_data() -> None:
    a, b = tiny(), tiny()
    masks_a = prune(a, UnstructuredPrune(target_sparsity=0.5, criterion=Random(seed=3)))
    masks_b = prune(b, UnstructuredPrune(target_sparsity=0.5, criterion=Random(seed=3)))
    assert all(torch.equal(masks_a[n], masks_b[n]) for n in masks_a)
    with pytest.raises(PruneError, match="at least one data batch"):
        prune(tiny(), UnstructuredPrune(target_sparsity=0.5, criterion=Taylor()), loss_fn=lambda o, y: o.sum())


def test_taylor_scores_are_weight_times_gradient() -> None:
    model = tiny()
    x = torch.tensor([[1.0, 2.0]])
    y = torch.zeros(1)
    batches = [(x, y)]
    loss_fn = lambda out, target: out.sum()  # noqa: E731
    config = UnstructuredPrune(target_sparsity=0.5, criterion=Taylor(batches=1), scope=Scope.LAYERWISE)
    masks = prune(model, config, batches=batches, loss_fn=loss_fn)
    # d(sum)/dW0[i, j] = W1[0, i] * x[j]: |w·g| for W0 = [[0.1·0.01·1, 0.4·0.01·2], [0.3·0.02·1, 0.2·0.02·2]]
    #                                                = [[0.001, 0.008], [0.006, 0.008]]
    assert masks["0.weight"].tolist() == [[False, True], [False, True]]


def test_sparsity_out_of_range() -> None:
    with pytest.raises(PruneError, match=r"sparsity must be in \[0, 1\)"):
        masks_for_sparsity({"w": torch.ones(3)}, sparsity=1.0)


def test_magnitude_l2_same_order_as_l1() -> None:
    model = tiny()
    l1 = prune(tiny(), UnstructuredPrune(target_sparsity=0.5, criterion=Magnitude(norm=1)))
    l2 = prune(model, UnstructuredPrune(target_sparsity=0.5, criterion=Magnitude(norm=2)))
    assert all(torch.equal(l1[n], l2[n]) for n in l1)
