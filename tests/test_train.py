"""The training loop's options: frozen parameters, progress lines in a log."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import spiralkit.train
from spiralkit.cpu import native_bf16
from spiralkit.data import TensorLoader
from spiralkit.errors import SpiralError
from spiralkit.train import EpochCheckpoint, OptimizerConfig, TrainConfig, resolve_precision, supervised, train


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


class _Scaled:
    """A supervised objective with a learned parameter of its own and dropout: what an epoch checkpoint must restore."""

    def __init__(self, *, stop_at: int | None = None) -> None:
        self.scale = nn.Parameter(torch.ones(()))
        self.calls = 0
        self.stop_at = stop_at

    def parameters(self) -> list[nn.Parameter]:
        return [self.scale]

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt  # the process is stopped in the middle of an epoch
        return nn.functional.cross_entropy(nn.functional.dropout(model(x), 0.3) * self.scale, y)


def _dropout_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_a_training_stopped_mid_epoch_continues_after_its_last_epoch_and_ends_as_if_never_stopped(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = TrainConfig(epochs=4, optimizer=OptimizerConfig(lr=0.1, momentum=0.9), lr_schedule="cosine")
    reference, objective = _dropout_model(), _Scaled()
    expected = train(reference, _loader(), config=config, objective=objective, seed=5)

    checkpoint = EpochCheckpoint(path=tmp_path / "epoch.pt", label="recover")
    model = _dropout_model()
    with pytest.raises(KeyboardInterrupt):  # 4 batches per epoch: stopped in epoch 3, after 2 saved epochs
        train(model, _loader(), config=config, objective=_Scaled(stop_at=10), seed=5, checkpoint=checkpoint)
    assert torch.load(checkpoint.path, weights_only=True)["epochs"] == 2
    capsys.readouterr()
    resumed_objective = _Scaled()
    got = train(_dropout_model(), _loader(), config=config, objective=resumed_objective, seed=5, checkpoint=checkpoint,
                progress=True, description="recover")
    assert "recover: resuming after epoch 2/4 (epoch checkpoint)" in capsys.readouterr().out
    assert resumed_objective.calls == 8  # epochs 3 and 4 only
    assert got.steps == expected.steps == 16 and got.epoch_losses == expected.epoch_losses
    assert torch.equal(resumed_objective.scale.detach(), objective.scale.detach())


def test_an_epoch_checkpoint_of_another_training_is_not_resumed(tmp_path) -> None:
    config = TrainConfig(epochs=2, optimizer=OptimizerConfig(lr=0.1))
    path = tmp_path / "epoch.pt"
    train(_model(), _loader(), config=config, objective=_Scaled(), seed=0, checkpoint=EpochCheckpoint(path=path, label="round 1"))
    other = _Scaled()
    train(_model(), _loader(), config=config, objective=other, seed=0, checkpoint=EpochCheckpoint(path=path, label="round 2"))
    assert other.calls == 8  # trained from its first epoch
    assert torch.load(path, weights_only=True)["label"] == "round 2"


def test_an_unreadable_epoch_checkpoint_is_named_and_training_starts_afresh(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "epoch.pt"
    path.write_bytes(b"not a checkpoint")
    objective = _Scaled()
    train(_model(), _loader(), config=TrainConfig(epochs=1), objective=objective, seed=0,
          checkpoint=EpochCheckpoint(path=path, label="baseline"))
    assert objective.calls == 4
    assert "baseline: ignoring epoch.pt, not a readable epoch checkpoint" in " ".join(capsys.readouterr().out.split())


def _conv_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def _image_loader() -> TensorLoader:
    generator = torch.Generator().manual_seed(1)
    return TensorLoader(torch.randn(32, 1, 6, 6, generator=generator), torch.randint(0, 3, (32,), generator=generator),
                        batch_size=8, shuffle=True, seed=0)


def _train_recording_dtypes(precision: str) -> tuple[nn.Module, list[torch.dtype], list[torch.dtype]]:
    model, outputs, losses = _conv_model(), [], []
    loss_fn = supervised(nn.functional.cross_entropy)

    def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        outputs.append(model(x).dtype)
        loss = loss_fn(model, x, y)
        losses.append(loss.dtype)
        return loss

    config = TrainConfig(epochs=2, optimizer=OptimizerConfig(lr=0.1), precision=precision)
    train(model, _image_loader(), config=config, objective=objective, seed=0)
    return model, outputs, losses


def test_bf16_precision_runs_the_forward_in_bfloat16_and_keeps_float32_weights() -> None:
    mixed, outputs, losses = _train_recording_dtypes("bf16")
    assert set(outputs) == {torch.bfloat16} and set(losses) == {torch.float32} and len(outputs) == 8
    assert all(p.dtype == torch.float32 for p in mixed.parameters())
    plain, outputs32, _ = _train_recording_dtypes("fp32")
    assert set(outputs32) == {torch.float32}
    moved = [not torch.equal(a, b) for a, b in zip(mixed.parameters(), _conv_model().parameters(), strict=True)]
    assert all(moved)  # it trained
    gap = max((a - b).abs().max().item() for a, b in zip(mixed.parameters(), plain.parameters(), strict=True))
    assert 0 < gap < 0.05  # bf16 rounding changes the result, a little
    with torch.no_grad():  # and outside training the model runs in float32 again
        assert mixed(torch.randn(1, 1, 6, 6)).dtype == torch.float32


def test_bf16_on_a_cpu_without_bf16_instructions_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spiralkit.train, "native_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match=r"precision bf16 on a CPU without bfloat16 instructions .* set "
                                            r"train.precision: fp32 or auto on this machine") as record:
        _train_recording_dtypes("bf16")
    assert record[0].filename == __file__  # it points at the code that called train(), not inside it
    monkeypatch.setattr(spiralkit.train, "native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _train_recording_dtypes("bf16")
        _train_recording_dtypes("fp32")


def test_auto_precision_is_bf16_only_on_a_cpu_with_bf16_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spiralkit.train, "native_bf16", lambda: True)
    _, outputs, _ = _train_recording_dtypes("auto")
    assert set(outputs) == {torch.bfloat16}
    monkeypatch.setattr(spiralkit.train, "native_bf16", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no emulated-bf16 warning: it trains in fp32
        _, outputs, _ = _train_recording_dtypes("auto")
    assert set(outputs) == {torch.float32}
    assert resolve_precision("auto", "cuda") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"


def test_native_bf16_reads_the_flags() -> None:
    assert native_bf16(frozenset({"avx2", "avx512_bf16"})) and native_bf16(frozenset({"asimd", "bf16"}))
    assert not native_bf16(frozenset({"avx2", "fma"})) and not native_bf16(frozenset())


def test_an_unknown_precision_is_named() -> None:
    with pytest.raises(ValueError, match=r"precision\n  Input should be 'fp32', 'bf16' or 'auto'"):
        TrainConfig(precision="fp16")
