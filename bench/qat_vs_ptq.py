"""Benchmark: quantization-aware training vs post-training quantization on LeNet-5 / MNIST.

    python -m bench.qat_vs_ptq [--quick] [--checkpoint lenet5.safetensors] [--workdir DIR]

LeNet-5 is trained in float on the full MNIST (``$SPIRALKIT_DATA_DIR`` or ``--data-root``,
holding ``mnist/``) for two epochs, or loaded from ``--checkpoint``. Then, every number
measured in the same run on the 10,000 test images:

(a) 4-bit and 2-bit weights (per output channel, symmetric), float activations:
    round-to-nearest PTQ (`spiralkit.quant.nonzero.quantize_nonzero_`) vs QAT with logit
    distillation from the float model (one epoch; min/max scales and LSQ learned scales at
    4 bits, LSQ at 2 bits).
(b) Mixed precision at the size of uniform 4-bit weights: a sensitivity scan on the
    validation split, `choose_bits` under that budget, then round-to-nearest PTQ.
(c) 8 bits, weights and activations: PTQ static int8 (`spiralkit.quant.ptq`, ONNX Runtime)
    vs QAT (one epoch) exported to ONNX and run by ONNX Runtime on integer kernels; the QAT
    file's agreement with its PyTorch fake-quant model.

This is a script, not a test: it takes several minutes on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnxruntime
import torch
from torch import nn

from bench.common import add_common_arguments, default_data_root, trained_lenet5
from bench.common import format_table as common_table
from spiralkit.data import DataSpec, DataSplits, load_data
from spiralkit.export.onnx import OrtModel
from spiralkit.spiral.qat import QATRecovery, qat
from spiralkit.quant.affine import PerChannel
from spiralkit.quant.mixed import choose_bits, sensitivity_scan, weight_counts
from spiralkit.quant.nonzero import quantize_nonzero_
from spiralkit.quant.ort import integer_ops
from spiralkit.quant.ptq import StaticInt8, quantize
from spiralkit.quant.qat import export_qat_onnx
from spiralkit.tasks import Classification, evaluate
from spiralkit.train import OptimizerConfig, TrainConfig

THREADS = 1
TASK = Classification()
EXAMPLE = torch.zeros(1, 1, 28, 28)


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    setting: str
    method: str
    error: str
    note: str


def _error(model: nn.Module, splits: DataSplits) -> float:
    assert splits.test is not None
    return 100.0 - evaluate(TASK, model, splits.test).metric


def _recovery(args: argparse.Namespace) -> TrainConfig:
    """One epoch of SGD with a cosine schedule from a small learning rate: a fine-tune."""
    return TrainConfig(
        epochs=1,
        optimizer=OptimizerConfig(name="sgd", lr=0.01, momentum=0.9),
        lr_schedule="cosine",
        max_batches=100 if args.quick else None,
    )


def _qat(model: nn.Module, config: QATRecovery, splits: DataSplits, label: str) -> tuple[nn.Module, float]:
    start = time.perf_counter()
    student = qat(model, config, splits, task=TASK, progress=True)
    seconds = time.perf_counter() - start
    print(f"{label}: {seconds:.0f} s")
    return student, seconds


def _length(config: TrainConfig) -> str:
    batches = f" x {config.max_batches} batches" if config.max_batches else ""
    return f"{config.epochs} epoch{'s' if config.epochs != 1 else ''}{batches}"


def bench_low_bits(args: argparse.Namespace, model: nn.Module, splits: DataSplits, *, bits: int,
                   lsq_only: bool) -> list[Row]:
    """(a) b-bit weights, float activations: round-to-nearest PTQ vs QAT (min/max and/or LSQ scales)."""
    setting = f"W{bits} (per channel), A float"
    ptq = copy.deepcopy(model)
    quantize_nonzero_(ptq, bits, granularity=PerChannel())
    rows = [Row(setting, "PTQ round-to-nearest", f"{_error(ptq, splits):.2f}", "no training")]
    for learn in (True,) if lsq_only else (False, True):
        config = QATRecovery(bits=bits, quantize_activations=False, learn_scales=learn, train=_recovery(args))
        student, seconds = _qat(model, config, splits, f"QAT {bits}-bit{' LSQ' if learn else ''}")
        method = "QAT + distillation" + (", LSQ scales" if learn else ", min/max scales")
        rows.append(Row(setting, method, f"{_error(student, splits):.2f}", f"{_length(config.train)}, {seconds:.0f} s"))
    return rows


def bench_mixed(model: nn.Module, splits: DataSplits) -> list[Row]:
    """(b) Per-layer widths from a validation sensitivity scan, at the size of uniform 4 bits."""
    start = time.perf_counter()
    table = sensitivity_scan(model, evaluate=lambda m: evaluate(TASK, m, splits.val).metric)
    print(table)
    counts = weight_counts(model)
    budget = sum((n * 4 + 7) // 8 for n in counts.values())
    bits = choose_bits(table, size_of=counts, budget_bytes=budget, higher_is_better=True)
    mixed = copy.deepcopy(model)
    quantize_nonzero_(mixed, bits, granularity=PerChannel())
    widths = ", ".join(f"{name}:{b}" for name, b in bits.items())
    return [Row("mixed, size of W4", "PTQ with chosen widths", f"{_error(mixed, splits):.2f}",
                f"{widths} (scan {time.perf_counter() - start:.0f} s)")]


def bench_8bit(args: argparse.Namespace, model: nn.Module, splits: DataSplits, workdir: Path) -> list[Row]:
    """(c) W8A8: PTQ static int8 vs QAT, both run by ONNX Runtime on integer kernels."""
    q = quantize(model, StaticInt8(calibration_batches=8), splits.train, example=EXAMPLE, workdir=workdir / "ptq")
    rows = [Row("W8A8, ONNX Runtime", "PTQ static int8", f"{_error(q.model, splits):.2f}",
                f"kernels {dict(integer_ops(q.path))}")]
    student, seconds = _qat(model, QATRecovery(bits=8, train=_recovery(args)), splits, "QAT 8-bit")
    path = export_qat_onnx(student, EXAMPLE, workdir / "qat8.onnx")
    ort_model = OrtModel(path, threads=THREADS)
    rows.append(Row("W8A8, PyTorch fake-quant", "QAT + distillation", f"{_error(student, splits):.2f}",
                    f"{_length(_recovery(args))}, {seconds:.0f} s"))
    rows.append(Row("W8A8, ONNX Runtime", "QAT -> QDQ ONNX", f"{_error(ort_model, splits):.2f}",
                    f"kernels {dict(integer_ops(path))}"))
    assert splits.test is not None
    worst, off, disagree, total, logits = 0.0, 0, 0, 0, 0
    step = float(student.fc2.output_quant.scale)
    with torch.inference_mode():
        for x, _ in splits.test:
            expected, actual = student.eval()(x), ort_model(x)
            difference = (actual - expected).abs() / step
            worst = max(worst, float(difference.max()))
            off += int((difference > 0.5).sum())
            logits += difference.numel()
            disagree += int((actual.argmax(1) != expected.argmax(1)).sum())
            total += x.shape[0]
    rows.append(Row("W8A8, ORT vs PyTorch", "QAT logits", "-",
                    f"max |diff| {worst:.3f} output steps; {100 * off / logits:.2f}% of logits differ; "
                    f"argmax differs on {disagree}/{total}"))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a plain-text table."""
    return common_table(("setting", "method", "test error %", "note"), [(r.setting, r.method, r.error, r.note) for r in rows])


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.qat_vs_ptq", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, quick_help="short training runs (a smoke test)")
    parser.add_argument("--no-mixed", action="store_true", help="skip the mixed-precision scan")
    return default_data_root(parser.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print the table."""
    args = _parse(argv)
    torch.set_num_threads(THREADS)  # a shared small CPU: more threads than free cores only contend
    splits = load_data(DataSpec(name="mnist", root=args.data_root, batch_size=128, eval_batch_size=1000), seed=0)
    model = trained_lenet5(splits.train, checkpoint=args.checkpoint, quick=args.quick)
    rows = [Row("float32", "baseline", f"{_error(model, splits):.2f}", "")]
    with tempfile.TemporaryDirectory(prefix="spiralkit-bench-qat-") as tmp:
        workdir = args.workdir or Path(tmp)
        rows += bench_low_bits(args, model, splits, bits=4, lsq_only=False)
        rows += bench_low_bits(args, model, splits, bits=2, lsq_only=True)
        if not args.no_mixed:
            rows += bench_mixed(model, splits)
        rows += bench_8bit(args, model, splits, workdir)
    print()
    print(f"LeNet-5 / MNIST test set (10,000); torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"{THREADS} thread")
    print(format_table(rows))


if __name__ == "__main__":
    main()
