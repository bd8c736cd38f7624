"""Benchmark: spiralkit's three ResNet-18 plans at 50% of the MACs, in fp32 and int8, timed in one process.

    python -m bench.int8_plans [--step 32] [--repeats 60] [--clock cpu|wall]

torchvision's ResNet-18 (224x224, batch 1, random weights: latency does not depend on them),
pruned three ways to at most half of its MACs, as ``spiral bench --peers`` does:
``uniform`` (`spiralkit.bench.peers.spiralkit_plan`: L2 widths, multiples of 16), ``latency``
(`latency_plan` on an ONNX Runtime fp32 table) and ``latency_int8`` (the same on the int8
kernels' table, runtime ``ort_int8``). Each model, and the dense one, is exported and quantized
by spiralkit's static int8 (8 random calibration batches); eager fp32 and every ONNX Runtime
file (fp32 and int8) are then timed round-robin, 1 thread. Prints each plan's MACs and widths
and each file's median and speed-up over eager fp32. Tables are cached (``$SPIRALKIT_CACHE_DIR``).
Not a test; a few minutes of CPU.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import torch
import torchvision

from spiralkit.bench.peers import PLANS, _spiralkit_int8
from spiralkit.bench.runtimes import runtime
from spiralkit.bench.timing import time_interleaved
from spiralkit.measure import count_macs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", type=int, default=32, help="width grid step of the latency plans' tables")
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="clock of the tables")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 224, 224, generator=generator)
    calibration = [torch.randn(1, 3, 224, 224, generator=generator) for _ in range(8)]
    plans = {"uniform": PLANS["uniform"](model, x, macs=0.5)}
    for name in ("latency", "latency_int8"):
        plans[name] = functools.partial(PLANS[name], step=args.step, clock=args.clock)(model, x, macs=0.5)
    dense_macs = count_macs(model, x)
    for name, pruned in plans.items():
        widths = [m.out_channels for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]
        print(f"{name}: MACs kept {count_macs(pruned, x) / dense_macs:.4f}, conv widths {widths}")
    ort, eager = runtime("ort"), runtime("eager")
    with tempfile.TemporaryDirectory(prefix="int8-plans-") as scratch:
        work = Path(scratch)
        runs = {"eager fp32 (dense)": eager.from_module(model, x, threads=1, scratch=work)}
        for name, candidate in (("dense", model), *plans.items()):
            quantized = _spiralkit_int8(candidate, x, calibration, work / name, 1)
            runs[f"{name} ORT fp32"] = ort.from_onnx(quantized.float_path, x, threads=1)
            runs[f"{name} ORT int8"] = ort.from_onnx(quantized.path, x, threads=1)
        timed = time_interleaved({k: functools.partial(run, x) for k, run in runs.items()}, warmup=5,
                                 repeats=args.repeats)
    base = timed["eager fp32 (dense)"].median_ms
    for name, latency in timed.items():
        print(f"{name:24s} {latency.median_ms:8.2f} ms  {base / latency.median_ms:6.2f}x")


if __name__ == "__main__":
    main()
