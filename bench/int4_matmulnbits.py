"""Benchmark: weight-only int4 on ONNX Runtime's ``MatMulNBits`` vs fp32 and dynamic int8.

    python -m bench.int4_matmulnbits [--quick] [--blocks 4] [--workdir DIR]

Model: ``--blocks`` transformer feed-forward blocks, ``Linear(384→1536) → GELU →
Linear(1536→384)`` (MiniLM-L6's hidden and MLP widths), random weights from a fixed seed,
input ``(batch, 384)``. Batch 1 is one token (a decoding step: matrix-vector products, what
``MatMulNBits`` is built for); batch 32 is 32 tokens at once.

Candidates, all on the CPU with one intra-op thread:

* ``torch fp32`` — eager PyTorch, for reference;
* ``ort fp32`` — the float ONNX export (`spiralkit.export.onnx.export_onnx`);
* ``ort int8 dynamic`` — `spiralkit.quant.ptq.DynamicInt8` (int8 weights per tensor,
  activations quantized per batch at run time; ``DynamicQuantizeMatMul`` / ``MatMulInteger``);
* ``ort int4 acc0`` — `WeightOnlyConfig(bits=4, group_size=32)` exported by
  `spiralkit.quant.ort.export_weight_only_onnx`: one ``MatMulNBits`` per Linear,
  ``accuracy_level=0`` (float32 arithmetic; exactly the dequantized model);
* ``ort int4 acc4`` — the same with ``accuracy_level=4`` (ONNX Runtime may quantize the
  activations to int8 per block and multiply in integers).

Each batch size is timed with `spiralkit.bench.timing.time_interleaved` (every candidate once
per round, the start rotating, medians and p10/p90 over the rounds). The script also prints
the ops ONNX Runtime really runs (its optimised graph), each file's size, and each
candidate's agreement with eager fp32 (max |diff|, cosine). A script, not a test.
"""

from __future__ import annotations

import argparse
import copy
import platform
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import onnxruntime
import torch
from torch import Tensor, nn

from spiralkit.bench.timing import Timing, time_interleaved
from spiralkit.export.onnx import OrtModel, compare_outputs, export_onnx
from spiralkit.quant.ort import export_weight_only_onnx, optimized_ops
from spiralkit.quant.ptq import DynamicInt8, quantize
from spiralkit.quant.weight_only import WeightOnlyConfig, quantize_weights_

THREADS = 1
HIDDEN = 384
MLP = 1536
BATCHES = (1, 32)
GROUP = 32


def feed_forward_stack(blocks: int, *, seed: int = 0) -> nn.Sequential:
    """``blocks`` × (Linear(384→1536), GELU, Linear(1536→384)), seeded."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(HIDDEN, MLP), nn.GELU(), nn.Linear(MLP, HIDDEN)]
    return nn.Sequential(*layers).eval()


def build_candidates(model: nn.Module, workdir: Path) -> tuple[dict[str, nn.Module], dict[str, Path]]:
    """The five candidates (see the module docstring) and the ONNX file of each ORT one."""
    example = torch.randn(8, HIDDEN)
    files = {"ort fp32": export_onnx(model, example, workdir / "fp32.onnx")}
    files["ort int8 dynamic"] = quantize(model, DynamicInt8(), None, example=example, workdir=workdir / "int8").path
    int4 = copy.deepcopy(model)
    quantize_weights_(int4, WeightOnlyConfig(bits=4, group_size=GROUP))
    for level in (0, 4):
        files[f"ort int4 acc{level}"] = export_weight_only_onnx(int4, example, workdir / f"int4_acc{level}.onnx",
                                                                accuracy_level=level)
    models: dict[str, nn.Module] = {"torch fp32": model}
    models.update({name: OrtModel(path, threads=THREADS) for name, path in files.items()})
    return models, files


def _call(model: nn.Module, x: Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return model(x)

    return run


def time_batch(models: dict[str, nn.Module], batch: int, *, warmup: int, repeats: int) -> dict[str, Timing]:
    """Interleaved timing of every candidate on one random batch."""
    x = torch.randn(batch, HIDDEN)
    return time_interleaved({name: _call(m, x) for name, m in models.items()}, warmup=warmup, repeats=repeats)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.int4_matmulnbits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (a smoke run, not numbers to quote)")
    parser.add_argument("--blocks", type=int, default=4, help="feed-forward blocks (default 4: 4.7 M weights)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the .onnx files here (default: a temp dir)")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {platform.processor() or platform.machine()}, "
          f"{THREADS} thread")
    model = feed_forward_stack(args.blocks)
    print(f"model: {args.blocks} x (Linear {HIDDEN}->{MLP}, GELU, Linear {MLP}->{HIDDEN}), "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    with tempfile.TemporaryDirectory(prefix="spiralkit-int4-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        models, files = build_candidates(model, workdir)
        check = torch.randn(16, HIDDEN)
        with torch.inference_mode():
            reference = model(check)
        rows = []
        for name, path in files.items():
            agreement = compare_outputs(reference, models[name](check))
            ops = ", ".join(f"{op} {n}" for op, n in sorted(optimized_ops(path).items()))
            rows.append([name, f"{path.stat().st_size / 1e6:.2f} MB", f"{agreement.max_abs_diff:.2e}",
                         f"{agreement.cosine:.6f}", ops])
        print(_table(["candidate", "file", "max |diff| vs fp32", "cosine", "ops ONNX Runtime runs"], rows))
        timing_rows = []
        for batch in BATCHES:
            repeats = (20 if args.quick else 300) if batch == 1 else (5 if args.quick else 60)
            timings = time_batch(models, batch, warmup=2 if args.quick else 10, repeats=repeats)
            base = timings["ort fp32"].median_ms
            for name, t in timings.items():
                timing_rows.append([str(batch), name, f"{t.median_ms:.3f}", f"{t.p10_ms:.3f}-{t.p90_ms:.3f}",
                                    f"{base / t.median_ms:.2f}x", str(t.repeats)])
        print(_table(["batch", "candidate", "median ms", "p10-p90 ms", "speed vs ort fp32", "repeats"], timing_rows))


if __name__ == "__main__":
    main()
