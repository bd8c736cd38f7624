"""Benchmark: distillation steps of a CIFAR ResNet in float32 and in bf16 mixed precision.

    python -m bench.train_precision [--model resnet20|resnet56] [--steps 5] [--repeats 5]

One recovery step of the DepGraph-scale recipe's kind: an option-A CIFAR ResNet student
learning from a frozen teacher of the same architecture (random weights: what is timed is
the work), logit KD, SGD + Nesterov, batch 128 of 32x32 images, one intra-op thread. Each
repeat times ``--steps`` steps of each precision, alternating, after a warm-up of both; the
table gives the median milliseconds per step and the ratio, measured in the same run. The
last column is how far the bf16 student ends from the fp32 one after the same steps from
the same weights (largest absolute weight difference): bf16 rounds, so it is not zero.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from bench.common import format_table
from spiralkit.data import TensorLoader
from spiralkit.models import cifar_resnet20, cifar_resnet56
from spiralkit.modules import freeze
from spiralkit.spiral.recovery import Distill
from spiralkit.tasks import Classification
from spiralkit.train import OptimizerConfig, TrainConfig, train

MODELS = {"resnet20": cifar_resnet20, "resnet56": cifar_resnet56}  # option A, as the CIFAR recipes
BATCH = 128


def _student(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]()


def _seconds_per_step(student: nn.Module, teacher: nn.Module, loader: TensorLoader, precision: str, steps: int) -> float:
    config = Distill(alpha=0.9, temperature=4.0, train=TrainConfig(
        epochs=1, max_batches=steps, precision=precision,  # type: ignore[arg-type]
        optimizer=OptimizerConfig(name="sgd", lr=0.02, momentum=0.9, weight_decay=1e-4, nesterov=True)))
    objective = config.objective(task=Classification(), teacher=teacher)
    start = time.perf_counter()
    train(student, loader, config=config.train, objective=objective, seed=0)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet20")
    parser.add_argument("--steps", type=int, default=5, help="steps per timing")
    parser.add_argument("--repeats", type=int, default=5, help="alternating timings of each precision")
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    loader = TensorLoader(torch.randn(BATCH * args.steps, 3, 32, 32, generator=generator),
                          torch.randint(0, 10, (BATCH * args.steps,), generator=generator), batch_size=BATCH, shuffle=False)
    teacher = freeze(_student(args.model).eval())
    students = {precision: _student(args.model) for precision in ("fp32", "bf16")}
    times: dict[str, list[float]] = {precision: [] for precision in students}
    for precision, student in students.items():  # warm-up: one-time costs in neither timing
        _seconds_per_step(student, teacher, loader, precision, 1)
    for _ in range(args.repeats):
        for precision, student in students.items():
            times[precision].append(_seconds_per_step(student, teacher, loader, precision, args.steps))
    gap = max((a - b).abs().max().item() for a, b in zip(students["fp32"].parameters(), students["bf16"].parameters(), strict=True))
    fp32 = statistics.median(times["fp32"])
    rows = [[precision, f"{statistics.median(t) * 1000:.0f}", f"{min(t) * 1000:.0f}–{max(t) * 1000:.0f}",
             f"{fp32 / statistics.median(t):.2f}x", "" if precision == "fp32" else f"{gap:.2e}"]
            for precision, t in times.items()]
    print(f"{args.model}, batch {BATCH}, logit KD from a same-size teacher, 1 thread, {args.repeats} x {args.steps} steps, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(format_table(["precision", "ms/step", "range", "speed-up", "max |w_bf16 − w_fp32|"], rows))


if __name__ == "__main__":
    main()
