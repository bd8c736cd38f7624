"""Benchmark: a latency-aware plan against uniform L2 pruning at the same MACs (ResNet-20, ONNX Runtime).

    python -m bench.latency_plan [--reduction 0.5] [--batch 64] [--step 8] [--clock cpu] [--runtime ort]
        [--json OUT.json]

On the pretrained CIFAR-10 ResNet-20 (option A, ``$SPIRALKIT_DATA_DIR/pretrained``), one
thread, ONNX Runtime fp32 (``--runtime ort_int8``: every table entry, calibration and timing on
spiralkit's static int8 instead):

1. builds the latency table of its blocks at ``--batch`` in a fresh cache directory and
   reports the build time (`spiralkit.latency.table_for`);
2. plans a ``1 / (1 − reduction)``x faster model from it (`calibration_ms` + `choose_widths`,
   L2 magnitude) and prints the predicted latency;
3. prunes the same model uniformly by L2 magnitude (layer-wise, every group, as
   ``scope: layerwise``) to the plan's MACs — with ``round_to`` 1 and 16 — by bisection on
   the ratio (the smallest ratio whose MACs are at most the plan's);
4. times all four models at ``--batch`` and at batch 1 in one process, interleaved
   (`spiralkit.latency.interleaved_ms`: the lowest of ``--passes`` medians of 5 runs), and
   prints MACs, latency, speed-up and speed-up / MACs reduction.

``--clock cpu`` (default) times the process's CPU time, which a machine whose cores other
jobs share does not inflate by preemption; ``wall`` is the wall clock. Not a test.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from spiralkit.latency import calibration_ms, choose_widths, interleaved_ms, table_for
from spiralkit.measure import count_macs
from spiralkit.models import load_weights
from spiralkit.models.resnet_cifar import cifar_resnet20
from spiralkit.prune.apply import apply_plan
from spiralkit.prune.plan import PrunePlan
from spiralkit.prune.structured import Planner, StructuredPrune, planner

CHECKPOINT = "pretrained/cifar10_resnet20_akamaster.safetensors"


def _macs(model: nn.Module) -> int:
    return count_macs(model, torch.zeros(1, 3, 32, 32))


def uniform_at_macs(plan_for: Planner, model: nn.Module, macs: int) -> PrunePlan:
    """The smallest uniform ratio's plan whose pruned model has at most ``macs`` MACs (bisection)."""
    low, high = 0.0, 0.95
    best = plan_for(high)
    for _ in range(14):
        middle = (low + high) / 2
        plan = plan_for(middle)
        if _macs(apply_plan(copy.deepcopy(model), plan, mode="remove")) <= macs:
            high, best = middle, plan
        else:
            low = middle
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reduction", type=float, default=0.5, help="latency reduction to plan for (0.5 = 2x faster)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--step", type=int, default=8, help="width grid step")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--runtime", choices=("ort", "ort_int8"), default="ort")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    data = Path(os.environ.get("SPIRALKIT_DATA_DIR", "../shared/data"))
    torch.manual_seed(0)
    model = cifar_resnet20()
    load_weights(model, data / CHECKPOINT)
    model.eval()
    x = torch.randn(args.batch, 3, 32, 32)
    plan_for = planner(model, StructuredPrune(ratio=0.0), example=x)
    timing = {"clock": args.clock, "passes": args.passes}

    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        blocks, table = table_for(plan_for, model, x, runtime=args.runtime, threads=1, step=args.step, directory=Path(cache),
                                  clock=args.clock)
        build_s = time.perf_counter() - start
    print(f"latency table: {table.timed} entries ({len(table.entries)} block shapes) built in {build_s:.1f} s "
          f"({args.runtime} {table.env.runtime_version}, batch {args.batch}, 1 thread, {args.clock} clock)")
    full_ms, narrow_ms = calibration_ms(model, plan_for, x, runtime=args.runtime, threads=1, step=args.step, **timing)
    print(f"calibration: dense {full_ms:.2f} ms, narrowest {narrow_ms:.2f} ms")
    chosen = choose_widths(plan_for, blocks, table, target_ms=(1 - args.reduction) * full_ms, measured_ms=full_ms,
                           narrowest_ms=narrow_ms, step=args.step)
    print(f"plan widths {chosen.counts}")
    latency = apply_plan(copy.deepcopy(model), chosen.plan, mode="remove")
    macs = _macs(latency)
    models = {"dense": model, "latency plan": latency}
    for round_to in (1, 16):
        uniform_for = planner(model, StructuredPrune(ratio=0.0, round_to=round_to), example=x)
        models[f"uniform L2 round_to {round_to}"] = apply_plan(copy.deepcopy(model), uniform_at_macs(uniform_for, model, macs),
                                                              mode="remove")
    results = {}
    for batch in (args.batch, 1):
        xb = torch.randn(batch, 3, 32, 32)
        ms = interleaved_ms([(m, xb) for m in models.values()], runtime=args.runtime, threads=1, **timing)
        results[batch] = dict(zip(models, ms))
    dense_macs = _macs(model)
    rows = []
    print(f"\n| model | MACs (batch 1) | MACs reduction | ms @{args.batch} | speed-up @{args.batch} | ratio @{args.batch} "
          "| ms @1 | speed-up @1 | ratio @1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, m in models.items():
        reduction = dense_macs / _macs(m)
        row = {"model": name, "macs": _macs(m), "macs_reduction": reduction}
        cells = [name, f"{_macs(m):,}", f"{reduction:.2f}x"]
        for batch in (args.batch, 1):
            speedup = results[batch]["dense"] / results[batch][name]
            row |= {f"ms_b{batch}": results[batch][name], f"speedup_b{batch}": speedup,
                    f"ratio_b{batch}": speedup / reduction}
            cells += [f"{results[batch][name]:.2f}", f"{speedup:.2f}x", f"{speedup / reduction:.2f}"]
        rows.append(row)
        print("| " + " | ".join(cells) + " |")
    measured = results[args.batch]["latency plan"]
    print(f"\nlatency plan at batch {args.batch}: predicted {chosen.predicted_ms:.2f} ms, measured {measured:.2f} ms "
          f"(prediction error {100 * (chosen.predicted_ms / measured - 1):+.1f}%); target "
          f"{(1 - args.reduction) * full_ms:.2f} ms = {1 / (1 - args.reduction):.1f}x faster than the calibration's dense "
          f"{full_ms:.2f} ms; measured {results[args.batch]['dense'] / measured:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"table_build_s": build_s, "entries": table.timed, "predicted_ms": chosen.predicted_ms,
                                         "counts": chosen.counts, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
