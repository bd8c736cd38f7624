"""Benchmark: does distillation help a half-width LeNet-300-100 on MNIST?

    python -m bench.kd_lenet [--quick] [--checkpoint lenet5.safetensors] [--epochs 4]

A LeNet-5 teacher is trained on the full MNIST (``$SPIRALKIT_DATA_DIR`` or ``--data-root``,
holding ``mnist/``) for two epochs, or loaded from ``--checkpoint``. Three students of the
same architecture — LeNet-300-100 at half width, ``mlp(widths=(150, 50))`` — start from the
same weights and train for the same epochs with the same batches:

(a) on the labels alone (cross-entropy);
(b) with logit distillation from the teacher (Hinton et al. 2015, ``α``, ``T`` below);
(c) with (b) plus a FitNets hint from the student's last hidden layer (50) through a learned
    adapter to the teacher's penultimate features (ReLU after ``fc1``, 500).

Defaults (``α = 0.3``, ``T = 4``, hint weight 0.05) were picked on the validation accuracy
among α ∈ {0.3, 0.5, 0.7, 0.9}, T ∈ {2, 4, 8}, hint weight ∈ {0.01, 0.05, 0.2}; with
Hinton's usual ``α = 0.9`` the logit-KD student was no better than (a) at 4 epochs.

The table gives validation (5,400 examples held out of the training set: tune on these) and
test accuracy of each, the mean over ``--seeds`` student seeds, and the spread of the test
accuracy.
The teacher's outputs are computed once per setting (`spiralkit.distill.TeacherCache`), shared by its seeds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from bench.common import add_common_arguments, default_data_root, format_table, trained_lenet5
from spiralkit.data import DataSpec, load_data
from spiralkit.distill import HintTerm, LogitsTerm, TeacherCache
from spiralkit.modules import freeze
from spiralkit.spiral.recovery import Distill, Finetune, Recovery
from spiralkit.models import mlp
from spiralkit.tasks import Classification, evaluate
from spiralkit.train import OptimizerConfig, TrainConfig, train

THREADS = 1


def _settings(args: argparse.Namespace) -> dict[str, Recovery]:
    schedule = TrainConfig(epochs=args.epochs, optimizer=OptimizerConfig(name="sgd", lr=0.05, momentum=0.9),
                           lr_schedule="cosine", max_batches=60 if args.quick else None)
    logits = LogitsTerm(alpha=args.alpha, temperature=args.temperature)
    return {
        "(a) labels only": Finetune(train=schedule),
        "(b) logit KD": Distill(losses=(logits,), train=schedule),
        "(c) logit KD + hint": Distill(losses=(logits, HintTerm(student="relu2", teacher="relu", weight=args.hint_weight)),
                                       train=schedule),
    }


def _student(seed: int) -> nn.Module:
    torch.manual_seed(1000 + seed)
    return mlp(in_features=784, widths=(150, 50), num_classes=10)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.kd_lenet", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, quick_help="short teacher and student training (a smoke test)")
    parser.add_argument("--epochs", type=int, default=4, help="student epochs")
    parser.add_argument("--seeds", type=int, default=3, help="student seeds per setting")
    parser.add_argument("--alpha", type=float, default=0.3, help="weight of the KL term")
    parser.add_argument("--temperature", type=float, default=4.0, help="softening temperature T")
    parser.add_argument("--hint-weight", type=float, default=0.05, help="weight of the hint term in (c)")
    return default_data_root(parser.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> None:
    """Train the teacher and the three students, then print the table."""
    args = _parse(argv)
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    splits = load_data(DataSpec(name="mnist", root=args.data_root, batch_size=128, eval_batch_size=1000), seed=0)
    assert splits.test is not None
    task = Classification()
    teacher = freeze(trained_lenet5(splits.train, checkpoint=args.checkpoint, quick=args.quick))
    rows = [("teacher LeNet-5", f"{evaluate(task, teacher, splits.val).metric:.2f}",
             f"{evaluate(task, teacher, splits.test).metric:.2f}", "-", "-")]
    for name, recovery in _settings(args).items():
        accuracies, val_accuracies, seconds = [], [], 0.0
        with TeacherCache() as cache:  # one per setting (its taps), shared by the seeds
            for seed in range(args.seeds):
                student = _student(seed)
                objective = recovery.objective(task=task, teacher=teacher, cache=cache)
                start = time.perf_counter()
                train(student, splits.train, config=recovery.train, objective=objective, seed=seed, progress=True,
                      description=f"{name} seed {seed}")
                seconds += time.perf_counter() - start
                accuracies.append(evaluate(task, student, splits.test).metric)
                val_accuracies.append(evaluate(task, student, splits.val).metric)
        spread = f"{statistics.stdev(accuracies):.2f}" if len(accuracies) > 1 else "-"
        rows.append((f"student {name}", f"{statistics.mean(val_accuracies):.2f}", f"{statistics.mean(accuracies):.2f}",
                     spread, f"{seconds / args.seeds:.0f}"))
    print()
    print(f"MNIST test accuracy, student mlp(widths=(150, 50)), {args.epochs} epochs, SGD lr 0.05 cosine, "
          f"alpha {args.alpha}, T {args.temperature}, hint weight {args.hint_weight}, {args.seeds} seed(s), "
          f"{THREADS} thread, {time.perf_counter() - started:.0f} s in all")
    print(format_table(("model", "val acc %", "test acc %", "test std", "train s"), rows))


if __name__ == "__main__":
    main()
