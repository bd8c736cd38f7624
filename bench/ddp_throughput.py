"""Benchmark: training throughput, 2 processes × 1 thread (torchrun, gloo) against 1 process × 1 and × 2 threads.

    python -m bench.ddp_throughput --all [--repeats 3] [--model lenet300|lenet5]   # the three, interleaved
    python -m bench.ddp_throughput --threads 2                                     # one setting
    torchrun --standalone --nproc-per-node 2 -m bench.ddp_throughput --threads 1   # one setting, data-parallel

The workload is the demo's recovery: a student distilled (logit KD, teacher cache on, as the
demo) from a frozen teacher of the same architecture on ``mnist-sample`` (4,000 training
images), global batch 64, SGD. Weights are random: what is timed is the work, not the
accuracy. One warm-up epoch (which also fills each rank's teacher cache), then ``--epochs``
timed epochs; with ``--all`` the three settings run one after another ``--repeats`` times
and the table gives the median examples per second and its ratio to 1 process × 1 thread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import torch

from bench.common import format_table
from spiralkit.data import DataSpec, load_data
from spiralkit.models import lenet5, lenet300
from spiralkit.modules import freeze
from spiralkit.parallel import launched
from spiralkit.spiral.recovery import Distill
from spiralkit.tasks import Classification
from spiralkit.train import OptimizerConfig, TrainConfig, train

MODELS = {"lenet300": lenet300, "lenet5": lenet5}
SETTINGS = (("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2), ("2 processes x 1 thread", 2, 1))


def _one(args: argparse.Namespace) -> None:
    """Time one setting (this process, or each torchrun rank) and print one RESULT line from rank 0."""
    with launched() as world:
        torch.set_num_threads(args.threads)
        data = load_data(DataSpec(name="mnist-sample", batch_size=64, val_fraction=0.2), seed=0)
        torch.manual_seed(0)
        teacher = freeze(MODELS[args.model]())
        student = MODELS[args.model]()
        config = TrainConfig(epochs=1, optimizer=OptimizerConfig(name="sgd", lr=0.01, momentum=0.9), lr_schedule="constant")
        objective = Distill(train=config).objective(task=Classification(), teacher=teacher)
        train(student, data.train, config=config, objective=objective, seed=0, world=world)  # warm-up, fills the cache
        world.barrier()
        start = time.perf_counter()
        timed = config.model_copy(update={"epochs": args.epochs})
        train(student, data.train, config=timed, objective=objective, seed=1, world=world)
        world.barrier()
        seconds = time.perf_counter() - start
        examples = args.epochs * data.train.num_examples  # type: ignore[attr-defined]
        if world.main:
            print(f"RESULT processes={world.size} threads={args.threads} examples_per_s={examples / seconds:.1f} "
                  f"seconds={seconds:.2f}", flush=True)


def _command(processes: int, threads: int, args: argparse.Namespace) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] \
        if processes > 1 else [sys.executable]
    return [*launcher, "-m", "bench.ddp_throughput", "--threads", str(threads), "--epochs", str(args.epochs),
            "--model", args.model]


def _all(args: argparse.Namespace) -> None:
    """The three settings, interleaved ``--repeats`` times; the median of each."""
    measured: dict[str, list[float]] = {name: [] for name, _, _ in SETTINGS}
    for _ in range(args.repeats):
        for name, processes, threads in SETTINGS:
            out = subprocess.run(_command(processes, threads, args), capture_output=True, text=True, check=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT"))
            value = float(line.split("examples_per_s=")[1].split()[0])
            measured[name].append(value)
            print(f"{name}: {value:.0f} examples/s", flush=True)
    base = statistics.median(measured[SETTINGS[0][0]])
    rows = [(name, f"{statistics.median(v):.0f}", f"{min(v):.0f}-{max(v):.0f}", f"{statistics.median(v) / base:.2f}x")
            for name, v in measured.items()]
    print(f"{args.model}, distillation, global batch 64, {args.epochs} timed epoch(s), {args.repeats} repeats")
    print(format_table(("setting", "examples/s (median)", "range", "vs 1x1"), rows))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="run the three settings, interleaved")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", choices=sorted(MODELS), default="lenet300")
    args = parser.parse_args(argv)
    _all(args) if args.all else _one(args)


if __name__ == "__main__":
    main()
