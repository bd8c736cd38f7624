"""The recovery kinds fitted to the data: no teacher cache over augmented batches."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from spiralkit.spiral.recovery import Distill, Finetune, fitted_to
from spiralkit.train import TrainConfig


class _Loader:
    def __init__(self, augmented: bool) -> None:
        self.augmented = augmented


def test_the_teacher_cache_is_off_for_augmented_batches_only() -> None:
    distill = Distill()
    assert distill.cache_teacher
    assert fitted_to(distill, _Loader(augmented=True)).cache_teacher is False
    assert fitted_to(distill, _Loader(augmented=False)) is distill
    assert fitted_to(distill, object()) is distill, "a loader that does not say is not augmented"
    finetune = Finetune()
    assert fitted_to(finetune, _Loader(augmented=True)) is finetune
    assert fitted_to(Distill(), _Loader(augmented=True)).shared_cache() is None


@pytest.mark.parametrize("kind", [Distill, Finetune])
def test_last_epochs_only_in_the_round_reaching_the_target(kind: type[Distill] | type[Finetune]) -> None:
    recovery = kind(train=TrainConfig(epochs=2, max_batches=7), last_epochs=5)
    assert recovery.round_train(last=False) == recovery.train
    assert recovery.round_train(last=True) == TrainConfig(epochs=5, max_batches=7)
    assert kind(train=TrainConfig(epochs=2)).round_train(last=True).epochs == 2  # default: as every round


def test_last_epochs_below_zero_is_refused() -> None:
    with pytest.raises(ValidationError, match="last_epochs"):
        Distill(last_epochs=-1)
