"""Benchmark: post-training static int8 through ONNX Runtime vs eager fp32 PyTorch.

    python -m bench.int8 [--quick] [--checkpoint lenet5.safetensors] [--workdir DIR]

(a) LeNet-5 trained on the full MNIST (``$SPIRALKIT_DATA_DIR`` or ``--data-root``, holding
    ``mnist/``) for two epochs, or loaded from ``--checkpoint``: test error fp32 vs int8,
    file size of the float vs the int8 ``.onnx``, latency at batch 64.
(b) torchvision ResNet-18 (``weights=None``, 224x224, eval mode with the default BatchNorm
    statistics), calibrated on random-normal images: cosine similarity of int8 to fp32 outputs
    on other random-normal images, latency at batch 1.

Latency is `spiralkit.measure.measure_latency` (median of repeats after warm-up) with one
intra-op thread for PyTorch and ONNX Runtime alike; every ratio is measured in the same run.
This is a script, not a test: it takes a few minutes and needs the MNIST files.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnxruntime
import torch
import torchvision
from torch import nn

from bench.common import add_common_arguments, default_data_root, trained_lenet5
from bench.common import format_table as common_table
from spiralkit.data import DataSpec, load_data
from spiralkit.export.onnx import OrtModel, compare_outputs
from spiralkit.measure import measure_latency
from spiralkit.quant.ort import integer_ops
from spiralkit.quant.ptq import StaticInt8, quantize
from spiralkit.tasks import Classification, evaluate

THREADS = 1


@dataclass(frozen=True)
class Row:
    """One line of the results table: a quantity for fp32 and int8, and the target."""

    model: str
    quantity: str
    fp32: str
    int8: str
    result: str
    target: str
    ok: bool | None


@dataclass(frozen=True)
class Timing:
    """How hard to time: warm-up calls and timed repeats."""

    warmup: int
    repeats: int


def _latency_ms(model: nn.Module, example: torch.Tensor, timing: Timing) -> float:
    return measure_latency(model, example, threads=THREADS, warmup=timing.warmup, repeats=timing.repeats).median_ms


# --------------------------------------------------------------------------- (a) LeNet-5


def bench_lenet5(args: argparse.Namespace, workdir: Path, timing: Timing) -> list[Row]:
    """Test error, file size and batch-64 latency of LeNet-5, fp32 eager vs int8 ONNX Runtime."""
    splits = load_data(DataSpec(name="mnist", root=args.data_root, batch_size=128, eval_batch_size=1000), seed=0)
    assert splits.test is not None
    model = trained_lenet5(splits.train, checkpoint=args.checkpoint, quick=args.quick)
    config = StaticInt8(calibration_batches=8)
    q = quantize(model, config, splits.train, example=torch.zeros(1, 1, 28, 28), workdir=workdir / "lenet5")
    print(f"LeNet-5 int8 kernels: {dict(integer_ops(q.path))}")

    task = Classification()
    error_fp32 = 100.0 - evaluate(task, model, splits.test).metric
    error_int8 = 100.0 - evaluate(task, q.model, splits.test).metric
    float_bytes = q.float_path.stat().st_size
    # Per-tensor weight scales drop the per-channel scale arrays: how much of the size gap is theirs.
    q_tensor = quantize(model, config.model_copy(update={"per_channel": False}), splits.train,
                        example=torch.zeros(1, 1, 28, 28), workdir=workdir / "lenet5-per-tensor")
    error_tensor = 100.0 - evaluate(task, q_tensor.model, splits.test).metric
    x = next(iter(splits.test))[0][:64]
    eager = _latency_ms(model, x, timing)
    ort_fp32 = _latency_ms(OrtModel(q.float_path, threads=THREADS), x, timing)
    ort_int8 = _latency_ms(q.model, x, timing)
    name = "LeNet-5/MNIST"
    return [
        Row(name, "test error %", f"{error_fp32:.2f}", f"{error_int8:.2f}", f"{error_int8 - error_fp32:+.2f} pt",
            "<= +0.10 pt", error_int8 - error_fp32 <= 0.1),
        Row(name, ".onnx size (KB)", f"{float_bytes / 1e3:.0f}", f"{q.size_bytes / 1e3:.0f}",
            f"{float_bytes / q.size_bytes:.2f}x smaller", ">= 3.9x", float_bytes / q.size_bytes >= 3.9),
        Row(name, "per-tensor int8: error %, KB", f"{error_fp32:.2f}, {float_bytes / 1e3:.0f}",
            f"{error_tensor:.2f}, {q_tensor.size_bytes / 1e3:.0f}",
            f"{error_tensor - error_fp32:+.2f} pt, {float_bytes / q_tensor.size_bytes:.2f}x smaller", "(info)", None),
        Row(name, "latency b64 ms (ORT fp32)", f"{ort_fp32:.2f}", f"{ort_int8:.2f}",
            f"{ort_fp32 / ort_int8:.2f}x faster", "(info)", None),
        Row(name, "latency b64 ms (eager fp32)", f"{eager:.2f}", f"{ort_int8:.2f}",
            f"{eager / ort_int8:.2f}x faster", ">= 2x", eager / ort_int8 >= 2.0),
    ]


# --------------------------------------------------------------------------- (b) ResNet-18


def bench_resnet18(args: argparse.Namespace, workdir: Path, timing: Timing) -> list[Row]:
    """Output fidelity and batch-1 latency of a random-init ResNet-18, fp32 vs int8."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    generator = torch.Generator().manual_seed(1)
    calibration = [(torch.randn(4, 3, 224, 224, generator=generator), torch.zeros(4)) for _ in range(4 if args.quick else 8)]
    held_out = torch.randn(8 if args.quick else 32, 3, 224, 224, generator=generator)
    q = quantize(model, StaticInt8(calibration_batches=len(calibration)), calibration,
                 example=torch.zeros(1, 3, 224, 224), workdir=workdir / "resnet18")
    print(f"ResNet-18 int8 kernels: {dict(integer_ops(q.path))}")

    with torch.inference_mode():
        reference = torch.cat([model(chunk) for chunk in held_out.split(8)])
    fidelity = compare_outputs(reference, torch.cat([q.model(chunk) for chunk in held_out.split(8)]))
    ort_fp32_model = OrtModel(q.float_path, threads=THREADS)
    fidelity_fp32 = compare_outputs(reference, torch.cat([ort_fp32_model(chunk) for chunk in held_out.split(8)]))
    logit_scale = float(reference.abs().mean())

    x = held_out[:1]
    eager = _latency_ms(model, x, timing)
    ort_fp32 = _latency_ms(ort_fp32_model, x, timing)
    ort_int8 = _latency_ms(q.model, x, timing)
    float_bytes = q.float_path.stat().st_size
    name = "ResNet-18/random"
    return [
        Row(name, f"cosine to eager fp32 (n={len(held_out)})", f"{fidelity_fp32.cosine:.6f}", f"{fidelity.cosine:.6f}",
            f"max|diff| {fidelity.max_abs_diff:.3g} (mean|logit| {logit_scale:.3g})", ">= 0.999",
            fidelity.cosine >= 0.999),
        Row(name, ".onnx size (MB)", f"{float_bytes / 1e6:.1f}", f"{q.size_bytes / 1e6:.1f}",
            f"{float_bytes / q.size_bytes:.2f}x smaller", "(info)", None),
        Row(name, "latency b1 ms (ORT fp32)", f"{ort_fp32:.1f}", f"{ort_int8:.1f}",
            f"{ort_fp32 / ort_int8:.2f}x faster", "(info)", None),
        Row(name, "latency b1 ms (eager fp32)", f"{eager:.1f}", f"{ort_int8:.1f}",
            f"{eager / ort_int8:.2f}x faster", ">= 3x", eager / ort_int8 >= 3.0),
    ]


# --------------------------------------------------------------------------- table


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a plain-text table."""
    return common_table(
        ("model", "quantity", "fp32", "int8", "result", "target", "ok"),
        [(r.model, r.quantity, r.fp32, r.int8, r.result, r.target, "-" if r.ok is None else ("yes" if r.ok else "NO"))
         for r in rows],
    )


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.int8", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, quick_help="short training and fewer timing repeats")
    parser.add_argument("--only", choices=("lenet5", "resnet18"), default=None, help="run one part")
    return default_data_root(parser.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print the table."""
    args = _parse(argv)
    timing = Timing(warmup=3, repeats=10) if args.quick else Timing(warmup=10, repeats=50)
    # One thread throughout (training too): the benchmark shares a small CPU, and more threads
    # than free cores only add contention.
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory(prefix="spiralkit-bench-int8-") as tmp:
        workdir = args.workdir or Path(tmp)
        rows: list[Row] = []
        if args.only in (None, "lenet5"):
            rows += bench_lenet5(args, workdir, timing)
        if args.only in (None, "resnet18"):
            rows += bench_resnet18(args, workdir, timing)
    print()
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {platform.processor() or platform.machine()}, "
          f"{THREADS} thread, median of {timing.repeats} after {timing.warmup} warm-up")
    print(format_table(rows))


if __name__ == "__main__":
    main()
