"""Benchmark: one distillation epoch on MNIST with and without the teacher cache.

    python -m bench.teacher_cache [--teacher lenet5|resnet20] [--limit-train N] [--epochs E]

The student is LeNet-300-100, the teacher a LeNet-5 or a ResNet-20 (random weights: what is
timed is the work, not the accuracy), the loss logit KD plus a FitNets hint from the
student's last hidden layer to the teacher's penultimate features, so the cache holds
features as well as logits. Each setting trains ``--epochs`` epochs (default 2); the first
epoch fills the cache, and the table compares the seconds of the later epochs. Both runs
start from the same weights and see the same batches: the students must end identical.
One intra-op thread; the ratio is measured in the same run. Needs the MNIST files
(``$SPIRALKIT_DATA_DIR`` or ``--data-root``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import default_data_root, format_table
from spiralkit.data import DataSpec, load_data
from spiralkit.distill import CacheStats, HintTerm, LogitsTerm
from spiralkit.modules import freeze
from spiralkit.spiral.recovery import Distill
from spiralkit.models import lenet5, lenet300, resnet20
from spiralkit.tasks import Classification
from spiralkit.train import OptimizerConfig, TrainConfig, supervised, train

THREADS = 1
# The teacher's penultimate features: LeNet-5's ReLU after fc1 (500), ResNet-20's pooled features (64).
TEACHERS = {"lenet5": (lambda: lenet5(), "relu"), "resnet20": (lambda: resnet20(in_channels=1), "flatten")}


@dataclass(frozen=True)
class Run:
    """Seconds per epoch of one setting, the trained student and what its cache did."""

    seconds: list[float]
    student: nn.Module
    stats: CacheStats | None


def _run(teacher: nn.Module, tap: str, loader: object, *, cache: bool, epochs: int) -> Run:
    torch.manual_seed(0)
    student = lenet300()
    config = Distill(
        losses=(LogitsTerm(), HintTerm(student="relu2", teacher=tap, weight=0.1)),
        cache_teacher=cache,
        train=TrainConfig(epochs=1, optimizer=OptimizerConfig(name="sgd", lr=0.05), lr_schedule="constant"),
    )
    objective = config.objective(task=Classification(), teacher=teacher)
    seconds = []
    for epoch in range(epochs):
        start = time.perf_counter()
        train(student, loader, config=config.train, objective=objective, seed=epoch,  # type: ignore[arg-type]
              progress=True, description=f"{'cached' if cache else 'uncached'} epoch {epoch + 1}")
        seconds.append(time.perf_counter() - start)
    stats = objective.cache.stats if objective.cache is not None else None  # type: ignore[attr-defined]
    objective.close()  # type: ignore[attr-defined]
    return Run(seconds=seconds, student=student, stats=stats)


def _warm_up(teacher: nn.Module, loader: object) -> None:
    """A few steps first, so that one-time costs (imports, allocator) are in neither timing."""
    short = TrainConfig(epochs=1, max_batches=3)
    train(lenet300(), loader, config=short, objective=Distill(cache_teacher=False).objective(  # type: ignore[arg-type]
        task=Classification(), teacher=teacher), seed=0)


def _labels_only(loader: object) -> float:
    """Seconds of one epoch of the student on labels alone: what no cache can go below."""
    torch.manual_seed(0)
    start = time.perf_counter()
    train(lenet300(), loader, config=TrainConfig(epochs=1, optimizer=OptimizerConfig(name="sgd", lr=0.05)),
          objective=supervised(F.cross_entropy), seed=0, progress=True, description="labels only")  # type: ignore[arg-type]
    return time.perf_counter() - start


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.teacher_cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", choices=sorted(TEACHERS), default="lenet5")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per setting (>= 2; the first fills the cache)")
    parser.add_argument("--limit-train", type=int, default=None, help="train on this many MNIST examples")
    parser.add_argument("--data-root", default=None, help="directory holding mnist/ (default: $SPIRALKIT_DATA_DIR)")
    args = default_data_root(parser.parse_args(argv))
    if args.epochs < 2:
        parser.error("--epochs must be at least 2")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run both settings and print the table."""
    args = _parse(argv)
    torch.set_num_threads(THREADS)
    splits = load_data(DataSpec(name="mnist", root=args.data_root, batch_size=128, limit_train=args.limit_train), seed=0)
    build, tap = TEACHERS[args.teacher]
    torch.manual_seed(1)
    teacher = freeze(build())
    _warm_up(teacher, splits.train)
    floor = _labels_only(splits.train)
    plain = _run(teacher, tap, splits.train, cache=False, epochs=args.epochs)
    cached = _run(teacher, tap, splits.train, cache=True, epochs=args.epochs)
    later_plain, later_cached = statistics.mean(plain.seconds[1:]), statistics.mean(cached.seconds[1:])
    rows = [
        ("no teacher (labels only)", "-", f"{floor:.1f}", "-", "the floor: student work alone"),
        ("no cache", f"{plain.seconds[0]:.1f}", f"{later_plain:.1f}", "-", "-"),
        ("cache", f"{cached.seconds[0]:.1f}", f"{later_cached:.1f}", f"{later_plain / later_cached:.2f}x",
         str(cached.stats)),
    ]
    print()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {THREADS} thread; "
          f"teacher {args.teacher}, student LeNet-300-100, logits + hint; "
          f"{len(splits.train)} batches of 128 per epoch, {args.epochs} epochs")
    print(format_table(("setting", "epoch 1 s", "later epochs s", "speed-up", "cache"), rows))
    print(f"students identical with and without the cache: {'yes' if _same_weights(plain.student, cached.student) else 'NO'}")


if __name__ == "__main__":
    main()
