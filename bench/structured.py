"""Benchmark: structured pruning (50% of channels) — MACs, measured speed-up, time to prune.

    python -m bench.structured [--repeats 30]

Models: torchvision ResNet-18 (``weights=None``, 224x224, batch 1 and 8) and spiralkit's
ResNet-20 (1x28x28, batch 1, 8 and 64). For each, in the same run:

* MACs of the dense and the pruned model (`spiralkit.measure.count_macs`, batch 1) and
  their ratio;
* latency of both (`spiralkit.measure.measure_latency`, one intra-op thread, median after
  warm-up) and the speed-up, in eager PyTorch and in ONNX Runtime (both exported with
  `spiralkit.export.onnx.export_onnx` and run through `OrtModel`); the target is a speed-up
  of at least 0.8x the MACs reduction (``dense MACs / pruned MACs``). Eager PyTorch pays a
  fixed cost per operation and runs batch norm and ReLU as separate passes over memory,
  whose work halves (not quarters) with half the channels; ONNX Runtime folds batch norm
  into the convolutions and fuses the activations, so it shows what the smaller convolutions
  really gain;
* time to prune: spiralkit (`plan_pruning` + `apply_plan(mode="remove")`, L2 magnitude,
  layer-wise 50%) against plain Torch-Pruning (``tp.pruner.BasePruner`` with
  ``GroupMagnitudeImportance(p=2)``, 50%, the classifier ignored) on fresh copies of the same
  model; median of three runs each.

``--conv-rates`` also times single 3x3 convolution + ReLU layers of ResNet-20's shapes in
ONNX Runtime (batch 64, the dense widths 16/32/64 and the pruned 8/16/32 on 28/14/7 pixel
maps) and prints their MAC rate: a pruned network can only reach a speed-up of r x its MACs
reduction if its narrow layers compute at r x the MAC rate of the dense layers.

This is a script, not a test; it takes about a minute and a half on a quiet CPU. Numbers from a shared
machine are noisy: run it when the CPU is otherwise idle.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch_pruning as tp
import torchvision
from torch import nn

from spiralkit.export.onnx import OrtModel, export_onnx
from spiralkit.measure import count_macs, measure_latency
from spiralkit.models import resnet20
from spiralkit.prune.apply import apply_plan
from spiralkit.prune.structured import StructuredPrune, plan_pruning

THREADS = 1
RATIO = 0.5
SPEEDUP_TARGET = 0.8  # speed-up >= 0.8 x MACs reduction


@dataclass(frozen=True)
class Case:
    """A model to prune and its input shape (without the batch dimension)."""

    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    classifier: str
    batches: tuple[int, ...] = (1, 8)


CASES = (
    Case("torchvision resnet18", lambda: torchvision.models.resnet18(weights=None), (3, 224, 224), "fc"),
    # 8-64 channels on 28x28 maps: at small batches a fixed cost per operation dominates,
    # so batch 64 is measured as well.
    Case("spiralkit resnet20", lambda: resnet20(in_channels=1), (1, 28, 28), "fc", batches=(1, 8, 64)),
)


def prune_spiralkit(model: nn.Module, example: torch.Tensor) -> nn.Module:
    plan = plan_pruning(model, StructuredPrune(ratio=RATIO), example=example)
    return apply_plan(model, plan, mode="remove")


def prune_torch_pruning(model: nn.Module, example: torch.Tensor, classifier: str) -> nn.Module:
    pruner = tp.pruner.BasePruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=RATIO,
        ignored_layers=[model.get_submodule(classifier)],
    )
    pruner.step()
    return model


def median_seconds(action: Callable[[], object], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(case: Case, repeats: int) -> list[str]:
    torch.manual_seed(0)
    dense = case.build().eval()
    example = torch.randn(1, *case.shape)
    copies = [copy.deepcopy(dense) for _ in range(6)]
    ours = median_seconds(lambda: prune_spiralkit(copies.pop(), example))
    theirs = median_seconds(lambda: prune_torch_pruning(copies.pop(), example, case.classifier))
    pruned = prune_spiralkit(copy.deepcopy(dense), example).eval()
    tp_model = prune_torch_pruning(copy.deepcopy(dense), example, case.classifier).eval()
    macs_dense, macs_pruned = count_macs(dense, example), count_macs(pruned, example)
    reduction = macs_dense / macs_pruned
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        runtimes = {"PyTorch": (dense, pruned)}
        runtimes["ONNX Runtime"] = tuple(  # type: ignore[assignment]
            OrtModel(export_onnx(model, example, Path(directory) / f"{tag}.onnx"), threads=THREADS)
            for tag, model in (("dense", dense), ("pruned", pruned))
        )
        for runtime, (slow, fast) in runtimes.items():
            for batch in case.batches:
                x = torch.randn(batch, *case.shape)
                before = measure_latency(slow, x, threads=THREADS, warmup=5, repeats=repeats)
                after = measure_latency(fast, x, threads=THREADS, warmup=5, repeats=repeats)
                speedup = before.median_ms / after.median_ms
                verdict = "ok" if speedup >= SPEEDUP_TARGET * reduction else "below"
                rows.append(
                    f"| {case.name} | {runtime} | {batch} | {macs_dense / 1e6:,.1f} → {macs_pruned / 1e6:,.1f} "
                    f"({macs_pruned / macs_dense:.3f}) | {before.median_ms:.2f} → {after.median_ms:.2f} | "
                    f"{speedup:.2f}x | {reduction:.2f}x | {speedup / reduction:.2f} {verdict} |"
                )
    rows.append(
        f"| {case.name} | time to prune | | spiralkit {ours:.3f} s | Torch-Pruning {theirs:.3f} s "
        f"| {ours / theirs:.2f}x | TP's MACs {count_macs(tp_model, example) / 1e6:,.1f} M | |"
    )
    return rows


CONV_SHAPES = ((16, 28), (8, 28), (32, 14), (16, 14), (64, 7), (32, 7))  # (channels, map size): dense, pruned


class _ConvReLU(nn.Sequential):
    def __init__(self, channels: int) -> None:
        super().__init__(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())


def conv_rates(repeats: int, batch: int = 64) -> list[str]:
    """Markdown rows: ONNX Runtime time and GMAC/s of one ``channels``→``channels`` 3x3 conv + ReLU."""
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for channels, size in CONV_SHAPES:
            layer = _ConvReLU(channels).eval()
            example = torch.randn(1, channels, size, size)
            session = OrtModel(export_onnx(layer, example, Path(directory) / f"conv{channels}_{size}.onnx"), threads=THREADS)
            x = torch.randn(batch, channels, size, size)
            median = measure_latency(session, x, threads=THREADS, warmup=5, repeats=repeats).median_ms
            macs = count_macs(layer, x)
            rows.append(f"| {channels} | {size}x{size} | {batch} | {macs / 1e6:,.1f} | {median:.3f} | {macs / median / 1e6:.0f} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per latency measurement")
    parser.add_argument("--conv-rates", action="store_true", help="also time single convolutions of ResNet-20's shapes")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(THREADS)
    print(f"torch {torch.__version__}, torch-pruning {tp.__version__}, {platform.processor() or platform.machine()}, "
          f"{THREADS} thread, 50% channels, L2 magnitude, layer-wise")
    print("| model | runtime | batch | MMACs dense → pruned (ratio) | latency ms dense → pruned | speed-up "
          "| MACs reduction | speed-up / reduction (target ≥ 0.8) |")
    print("|---|---|---|---|---|---|---|---|")
    for case in CASES:
        for row in run(case, args.repeats):
            print(row, flush=True)
    if args.conv_rates:
        print("\nONNX Runtime, one 3x3 convolution + ReLU, channels → same channels")
        print("| channels | map | batch | MMACs | ms | GMAC/s |")
        print("|---|---|---|---|---|---|")
        for row in conv_rates(args.repeats):
            print(row, flush=True)


if __name__ == "__main__":
    main()
