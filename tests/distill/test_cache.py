"""Teacher cache: the same outputs as running the teacher, and the teacher run once per example."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from spiralkit.data import TensorLoader
from spiralkit.data.imageloader import ImageLoader
from spiralkit.distill import HintTerm, LogitsTerm, TeacherCache
from spiralkit.modules import freeze
from spiralkit.spiral.recovery import Distill
from spiralkit.distill.cache import CachedModel, row_keys
from spiralkit.tasks import Classification
from spiralkit.train import OptimizerConfig, TrainConfig, train


class Counting(nn.Module):
    """A teacher that counts the examples it is run on."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)
        self.rows = 0

    def forward(self, x: Tensor) -> Tensor:
        self.rows += x.shape[0]
        return self.fc2(self.fc1(x).relu())


def _data(n: int = 40) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def _logits(teacher: nn.Module):  # noqa: ANN202
    return lambda rows: {"logits": teacher(rows)}


def test_fetch_matches_the_teacher_and_computes_each_row_once() -> None:
    teacher = freeze(Counting())
    x, _ = _data()
    cache = TeacherCache(segment_mb=100 / 2**20)  # 8 rows of 3 floats per segment: several segments
    with cache:
        for epoch in range(3):
            order = torch.randperm(40, generator=torch.Generator().manual_seed(epoch))
            for batch in order.split(16):
                got = cache.fetch(x[batch], _logits(teacher))
                assert torch.equal(got["logits"], teacher(x[batch]).detach())
                teacher.rows -= len(batch)  # the reference call above does not count
        assert teacher.rows == 40
        stats = cache.stats
    assert (stats.misses, stats.hits, stats.stored_rows, stats.disk_bytes) == (40, 80, 40, 0)
    assert "80 hits, 40 computed, 40 stored" in str(stats)


def test_cached_model_is_the_model_run_once_per_row_for_repeated_evaluations() -> None:
    teacher = Counting().eval()
    x, y = _data()
    with TeacherCache() as cache:
        reference = CachedModel(teacher, cache)
        with torch.no_grad():
            first = torch.cat([reference(xb) for xb, _ in TensorLoader(x, y, batch_size=16, shuffle=False)])
            again = torch.cat([reference(xb) for xb, _ in TensorLoader(x, y, batch_size=7, shuffle=True, seed=3)])
            expected = teacher(x)
    assert teacher.rows == 40 + 40  # once through the cache, once for `expected`
    assert torch.allclose(first, expected)
    assert sorted(map(tuple, again.tolist())) == sorted(map(tuple, first.tolist()))


def test_augmented_batches_never_reuse_an_output_computed_for_another_input() -> None:
    # The cache rule: rows are keyed by their bytes, so a randomly cropped or flipped image
    # is a new row; an output is reused only for a byte-identical input.
    torch.manual_seed(0)
    teacher = freeze(nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 3)))
    images = torch.randint(0, 256, (12, 3, 6, 6), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    loader = ImageLoader(images, torch.arange(12), batch_size=5, shuffle=True, augment=True,
                         mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert loader.augmented
    seen: dict[bytes, Tensor] = {}
    with TeacherCache() as cache:
        for _ in range(4):
            for x, _ in loader:
                got = cache.fetch(x, _logits(teacher))["logits"]
                assert torch.equal(got, teacher(x))
                seen.update(zip(row_keys(x), x, strict=True))
        stats = cache.stats
    assert stats.misses == len(seen) > 12  # every distinct augmented input computed once
    assert stats.hits == 4 * 12 - len(seen)


def test_duplicate_rows_in_a_batch_are_computed_once() -> None:
    teacher = freeze(Counting())
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 3 + [[0.0, 0.0, 0.0, 1.0]])
    got = TeacherCache().fetch(x, _logits(teacher))["logits"]
    assert teacher.rows == 2
    assert torch.equal(got, teacher(x))
    assert len(set(row_keys(x))) == 2


def test_spill_to_disk_then_cleaned_up() -> None:
    teacher = freeze(Counting())
    x, _ = _data()
    cache = TeacherCache(budget_mb=0, segment_mb=100 / 2**20)  # no RAM: everything spills
    first = cache.fetch(x, _logits(teacher))["logits"]
    again = cache.fetch(x.flip(0), _logits(teacher))["logits"]
    assert torch.equal(again, first.flip(0)) and teacher.rows == 40
    assert cache.stats.ram_bytes == 0 and cache.stats.disk_bytes > 0
    folder = Path(cache._tmp.name)  # type: ignore[union-attr]
    assert len(list(folder.iterdir())) == 5  # 40 rows / 8 per segment, one file per output
    cache.close()
    assert not folder.exists()


def test_over_both_budgets_rows_are_computed_not_stored() -> None:
    teacher = freeze(Counting())
    x, _ = _data()
    cache = TeacherCache(budget_mb=0, disk_budget_mb=0)
    for _ in range(2):
        assert torch.equal(cache.fetch(x, _logits(teacher))["logits"], teacher(x))
    assert cache.stats.stored_rows == 0 and teacher.rows == 4 * 40


def test_inputs_of_another_shape_bypass_the_cache() -> None:
    teacher = freeze(nn.Flatten())
    cache = TeacherCache()
    cache.fetch(torch.arange(6.0).view(2, 3), lambda rows: {"out": teacher(rows)})
    other = cache.fetch(torch.ones(2, 5), lambda rows: {"out": teacher(rows)})
    assert other["out"].shape == (2, 5) and cache.stats.stored_rows == 2


def _objective_losses(cached: bool, teacher: Counting, *, epochs: int = 3) -> list[float]:
    x, y = _data()
    config = Distill(losses=(LogitsTerm(), HintTerm(student="fc1", teacher="fc1", weight=0.5)), cache_teacher=cached)
    objective = config.objective(task=Classification(), teacher=freeze(teacher))
    torch.manual_seed(0)
    student = nn.Sequential()
    student.add_module("fc1", nn.Linear(4, 2))
    student.add_module("relu", nn.ReLU())
    student.add_module("fc2", nn.Linear(2, 3))
    objective.prepare(student, x[:8])
    loader = TensorLoader(x, y, batch_size=16, shuffle=True, seed=3)
    losses = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        losses += [objective(student, xb, yb).item() for xb, yb in loader]
    return losses


def test_objective_identical_with_and_without_cache_and_teacher_runs_once_per_example() -> None:
    plain, cached = Counting(), Counting()
    assert _objective_losses(False, plain) == _objective_losses(True, cached)
    assert plain.rows == 8 + 3 * 40
    assert cached.rows == 40, "each example once: prepare's 8 rows are reused too"


def test_a_shared_cache_serves_later_rounds() -> None:
    teacher = freeze(Counting())
    x, y = _data()
    loader = TensorLoader(x, y, batch_size=16, shuffle=True)
    config = Distill(train=TrainConfig(epochs=2, optimizer=OptimizerConfig(lr=0.01)))
    with TeacherCache() as cache:
        for round_seed in range(3):
            student = nn.Linear(4, 3)
            objective = config.objective(task=Classification(), teacher=teacher, cache=cache)
            train(student, loader, config=config.train, objective=objective, seed=round_seed)
    assert teacher.rows == 40


@pytest.mark.parametrize("bad", [{"budget_mb": -1}, {"segment_mb": 0}])
def test_bad_budgets(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="cache budgets must be >= 0"):
        TeacherCache(**bad)


def test_outputs_not_batch_first_are_not_cached() -> None:
    cache = TeacherCache()
    x = torch.arange(6.0).view(3, 2)

    def hidden_state_first(rows: Tensor) -> dict[str, Tensor]:  # e.g. an LSTM's (layers, B, H) state
        return {"h": rows.t().unsqueeze(0)}

    for _ in range(2):
        assert torch.equal(cache.fetch(x, hidden_state_first)["h"], x.t().unsqueeze(0))
    assert cache.stats.stored_rows == 0


def test_objectives_close_only_their_own_cache() -> None:
    teacher = freeze(Counting())
    x, _ = _data(8)
    with TeacherCache() as shared:
        borrowed = Distill().objective(task=Classification(), teacher=teacher, cache=shared)
        borrowed.cache.fetch(x, _logits(teacher))  # type: ignore[attr-defined]
        borrowed.close()  # type: ignore[attr-defined]
        assert shared.stats.stored_rows == 8
    own = Distill().objective(task=Classification(), teacher=teacher)
    own.cache.fetch(x, _logits(teacher))  # type: ignore[attr-defined]
    own.close()  # type: ignore[attr-defined]
    assert own.cache.stats.stored_rows == 0  # type: ignore[attr-defined]
    assert Distill(cache_teacher=False).objective(task=Classification(), teacher=teacher).cache is None  # type: ignore[attr-defined]
