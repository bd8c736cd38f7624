"""Benchmark: a finished MiniLM-at-4x run's five models, timed interleaved in one process.

    python -m bench.minilm_4x runs/minilm_sst2_4x [--batch 32] [--repeats 20] [--other]

The run is recipes/minilm_sst2_4x.yaml's (any run with a student stage, structured rounds and
an int8 quantize stage will do). Its models:

* ``teacher eager``: the recipe's model with ``baseline.safetensors``, PyTorch fp32 (the
  report's baseline);
* ``teacher ORT``: the same exported to ONNX and run in ONNX Runtime fp32 (written to the
  run's ``bench/teacher.fp32.onnx``);
* ``student``: rebuilt from ``student.json`` and ``student.safetensors`` (eager);
* ``pruned student``: the run's pruned float model (eager);
* ``final``: the run's int8 ONNX file (its report's final row) in ONNX Runtime;
* with ``--other``, also the pruned model quantized here with the other int8 kind (static
  int8, calibrated on 8 training batches, when the run used dynamic; dynamic when it used
  static), to compare the two on speed and accuracy.

All run on 1 thread, call by call in turn, so that load on a shared machine hits each alike;
inputs as `bench.student_speed` (``dev``: the 32 longest validation sentences, ``full``:
32 rows of 64 real tokens). Eager models cut all-padding columns of ``dev``; ONNX graphs have
a fixed sequence length of 64 and do not. Prints the medians, the speed-up of each against
the eager teacher and against the ONNX Runtime teacher, the dev accuracy and size of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from spiralkit.data import DataSplits, load_data
from spiralkit.errors import SpiralError
from spiralkit.export.onnx import OrtModel, export_onnx
from spiralkit.quant.ptq import DynamicInt8, StaticInt8, quantize
from spiralkit.spiral.context import example_input
from spiralkit.spiral.export import pruned_model
from spiralkit.spiral.recipe import load_recipe
from spiralkit.spiral.rundir import BASELINE, MODEL, RECIPE, STUDENT_LAYOUT, STUDENT_WEIGHTS, load_run_state
from spiralkit.tasks import evaluate

from bench.common import format_table
from bench.student_speed import inputs, models

BENCH_DIR = "bench"


def check_run(run_dir: Path) -> Path:
    """The int8 artefact of a finished run with a student stage and a quantize stage.

    Raises:
        SpiralError: a file the benchmark needs is missing, or the run has no int8 final model;
            the message names the file.
    """
    for name in (RECIPE, BASELINE, STUDENT_LAYOUT, STUDENT_WEIGHTS, MODEL):
        if not (run_dir / name).exists():
            raise SpiralError(f"{run_dir / name} is missing: bench.minilm_4x needs a finished run with a student stage")
    quantization = load_run_state(run_dir).quantization
    if quantization is None or not quantization.artefact.endswith(".onnx"):
        raise SpiralError(f"{run_dir} has no int8 ONNX final model (its recipe needs quantize: dynamic-int8 or static-int8)")
    return run_dir / quantization.artefact


def interleave(named: dict[str, nn.Module], x: Tensor, *, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds of each ``model(x)``, the models called one after another, ``repeats`` times."""
    times: dict[str, list[float]] = {name: [] for name in named}
    with torch.inference_mode():
        for index in range(warmup + repeats):
            for name, model in named.items():
                start = time.perf_counter()
                model(x)
                if index >= warmup:
                    times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}


def build(run_dir: Path, data: DataSplits, *, other: bool) -> tuple[dict[str, nn.Module], dict[str, int]]:
    """The run's models by row name, and each one's size on disk in bytes (``data``: the run's)."""
    final_path = check_run(run_dir)
    recipe = load_recipe(run_dir / RECIPE)
    teacher, student = models(run_dir)
    example = example_input(data, 32)
    out = run_dir / BENCH_DIR
    teacher_onnx = export_onnx(teacher, example, out / "teacher.fp32.onnx")
    pruned = pruned_model(run_dir, recipe)
    named: dict[str, nn.Module] = {
        "teacher eager": teacher, "teacher ORT": OrtModel(teacher_onnx, threads=1), "student": student,
        "pruned student": pruned, "final": OrtModel(final_path, threads=1),
    }
    sizes = {"teacher eager": (run_dir / BASELINE).stat().st_size, "teacher ORT": teacher_onnx.stat().st_size,
             "student": (run_dir / STUDENT_WEIGHTS).stat().st_size, "pruned student": (run_dir / MODEL).stat().st_size,
             "final": final_path.stat().st_size}
    if other:
        state = load_run_state(run_dir)
        config = DynamicInt8() if state.quantization is not None and state.quantization.kind == "static-int8" else StaticInt8()
        result = quantize(pruned, config, data.train, example=example, workdir=out / config.kind, threads=1)
        name = f"pruned, {config.kind}"
        named[name], sizes[name] = result.model, result.size_bytes
    return named, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--other", action="store_true", help="also the pruned model in the int8 kind the run did not use")
    args = parser.parse_args()
    torch.set_num_threads(1)
    check_run(args.run_dir)
    recipe = load_recipe(args.run_dir / RECIPE)
    data = load_data(recipe.data, seed=recipe.seed)
    named, sizes = build(args.run_dir, data, other=args.other)
    accuracy = {name: evaluate(recipe.task, model, data.test).metric for name, model in named.items()}
    cases = inputs(args.run_dir, args.batch)
    medians = {case: interleave(named, x, repeats=args.repeats) for case, x in cases.items()}
    rows = []
    for name in named:
        row = [name, f"{accuracy[name]:.2f}", f"{100 * accuracy[name] / accuracy['teacher eager']:.1f}%",
               f"{sizes[name] / 1e6:.1f}"]
        for case in cases:
            ms = medians[case]
            row += [f"{ms[name]:.1f}", f"{ms['teacher eager'] / ms[name]:.2f}x", f"{ms['teacher ORT'] / ms[name]:.2f}x"]
        rows.append(row)
    header = ["model", "dev accuracy", "of teacher", "MB"]
    for case in cases:
        header += [f"{case} ms", f"{case} vs eager", f"{case} vs ORT fp32"]
    print(f"1 thread, batch {args.batch}, median of {args.repeats} interleaved calls; dev accuracy on "
          f"{sum(len(y) for _, y in data.test)} sentences")
    print(format_table(header, rows))
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    print(contract(args.run_dir))


def contract(run_dir: Path) -> str:
    """The command contract from the run's ``report.json``: final against baseline, speed and metric."""
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    base, final = report["baseline"], report["final"]
    return (f"report.json: baseline {base['latency_ms']:.1f} ms ({base.get('latency_runtime')}), "
            f"final {final['latency_ms']:.1f} ms ({final.get('latency_runtime')}): "
            f"{base['latency_ms'] / final['latency_ms']:.2f}x faster; metric {final['metric']:.2f} vs "
            f"{base['metric']:.2f} = {100 * final['metric'] / base['metric']:.1f}%")


if __name__ == "__main__":
    main()
