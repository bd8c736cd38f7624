"""The training loop's options: frozen parameters, progress lines in a log."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from spiralkit.data import TensorLoader
from spiralkit.errors import SpiralError
from spiralkit.train import OptimizerConfig, TrainConfig, supervised, train


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _loader() -> TensorLoader:
    generator = torch.Generator().manual_seed(1)
    return TensorLoader(torch.randn(32, 4, generator=generator), torch.randint(0, 3, (32,), generator=generator),
                        batch_size=8, shuffle=True, seed=0)


def test_frozen_parameters_do_not_move_and_get_their_flag_back() -> None:
    model = _model()
    model[0].bias.requires_grad_(False)  # already frozen by the caller: stays so
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = TrainConfig(epochs=2, optimizer=OptimizerConfig(name="adamw", lr=0.1, weight_decay=0.1), freeze=("0.*",))
    train(model, _loader(), config=config, objective=supervised(nn.functional.cross_entropy), seed=0)
    after = dict(model.named_parameters())
    assert torch.equal(after["0.weight"], before["0.weight"]) and torch.equal(after["0.bias"], before["0.bias"])
    assert not torch.equal(after["2.weight"], before["2.weight"])
    assert after["0.weight"].requires_grad and not after["0.bias"].requires_grad


def test_a_freeze_pattern_matching_nothing_is_named() -> None:
    config = TrainConfig(epochs=1, freeze=("encoder.*",))
    with pytest.raises(SpiralError, match=r"train.freeze pattern 'encoder.\*' matches no parameter \(parameters: 0.weight"):
        train(_model(), _loader(), config=config, objective=supervised(nn.functional.cross_entropy), seed=0)


def test_progress_off_a_terminal_prints_one_line_per_epoch_with_its_mean_loss(capsys: pytest.CaptureFixture[str]) -> None:
    config = TrainConfig(epochs=2, optimizer=OptimizerConfig(lr=0.1))
    supervised_loss = supervised(nn.functional.cross_entropy)
    losses: list[float] = []

    def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = supervised_loss(model, x, y)
        losses.append(loss.item())
        return loss

    train(_model(), _loader(), config=config, objective=objective, seed=0, progress=True, description="recover")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and len(losses) == 8  # 32 rows in batches of 8, twice
    for epoch, line in enumerate(lines, start=1):
        match = re.fullmatch(rf"recover: epoch {epoch}/2, mean loss (\d+\.\d{{4}}), \d+ s", line)
        assert match, line
        assert float(match.group(1)) == pytest.approx(sum(losses[4 * epoch - 4:4 * epoch]) / 4, abs=5e-5)
    train(_model(), _loader(), config=config, objective=supervised_loss, seed=0, progress=False)
    assert capsys.readouterr().out == ""
