"""The recovery kinds fitted to the data: no teacher cache over augmented batches."""

from __future__ import annotations

from spiralkit.spiral.recovery import Distill, Finetune, fitted_to


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
