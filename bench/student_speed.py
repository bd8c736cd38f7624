"""Benchmark: a finished run's teacher against its student, timed alternately in one process.

    python -m bench.student_speed runs/minilm_sst2_distill [--batch 32] [--repeats 30]

The teacher is the recipe's model with the run's ``baseline.safetensors``; the student is
rebuilt from ``student.json`` and ``student.safetensors``. Both run the same inputs on one
thread, alternating call by call so that load on a shared machine hits both alike:

* ``dev``: the first ``--batch`` validation examples (the longest sentences, for text);
* ``full``: for text models, ``--batch`` rows whose every one of the tokenizer's
  ``max_length`` positions is a real token (the worst case, no padding to trim).

Prints each median, the speed-up and the MACs of both.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from spiralkit.data import load_data
from spiralkit.prune.students import apply_student, read_layout
from spiralkit.export import load_state
from spiralkit.measure import count_macs
from spiralkit.models import load_model
from spiralkit.spiral.recipe import load_recipe
from spiralkit.spiral.rundir import BASELINE, RECIPE, STUDENT_LAYOUT, STUDENT_WEIGHTS

from bench.common import format_table


def models(run_dir: Path) -> tuple[nn.Module, nn.Module]:
    """The run's teacher (baseline) and student, in eval mode."""
    recipe = load_recipe(run_dir / RECIPE)
    teacher = load_model(recipe.model.model_copy(update={"checkpoint": None}))
    teacher.load_state_dict(load_state(run_dir / BASELINE))
    student = apply_student(copy.deepcopy(teacher), read_layout(run_dir / STUDENT_LAYOUT))
    student.load_state_dict(load_state(run_dir / STUDENT_WEIGHTS))
    return teacher.eval(), student.eval()


def alternate(first: nn.Module, second: nn.Module, x: Tensor, *, repeats: int, warmup: int = 3) -> tuple[float, float]:
    """Median milliseconds of ``first(x)`` and ``second(x)``, timed call by call in turn."""
    times: tuple[list[float], list[float]] = ([], [])
    with torch.inference_mode():
        for index in range(warmup + repeats):
            for model, bucket in ((first, times[0]), (second, times[1])):
                start = time.perf_counter()
                model(x)
                if index >= warmup:
                    bucket.append(1000 * (time.perf_counter() - start))
    return statistics.median(times[0]), statistics.median(times[1])


def inputs(run_dir: Path, batch: int) -> dict[str, Tensor]:
    recipe = load_recipe(run_dir / RECIPE)
    data = load_data(recipe.data, seed=recipe.seed)
    rows = torch.cat([x for x, _ in data.val])[:batch]
    cases = {"dev": rows}
    if rows.dtype == torch.long and rows.ndim == 3 and rows.shape[1] == 2:  # packed [ids; mask] text rows
        full = rows[:1].repeat(batch, 1, 1)
        ids = torch.randint(1000, 2000, full[:, 0].shape, generator=torch.Generator().manual_seed(0))
        cases["full"] = torch.stack([ids, torch.ones_like(ids)], dim=1)
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    teacher, student = models(args.run_dir)
    rows = []
    for name, x in inputs(args.run_dir, args.batch).items():
        slow, fast = alternate(teacher, student, x, repeats=args.repeats)
        length = int(x[:, 1].sum(dim=1).max()) if x.ndim == 3 and x.shape[1] == 2 else x.shape[-1]
        rows.append([name, f"{tuple(x.shape)}", str(length), f"{slow:.1f}", f"{fast:.1f}", f"{slow / fast:.2f}x",
                     f"{count_macs(teacher, x) / 1e9:.2f}", f"{count_macs(student, x) / 1e9:.2f}"])
    print(f"1 thread, batch {args.batch}, median of {args.repeats} alternating calls")
    print(format_table(["input", "shape", "longest", "teacher ms", "student ms", "speed-up", "teacher GMACs",
                        "student GMACs"], rows))


if __name__ == "__main__":
    main()
