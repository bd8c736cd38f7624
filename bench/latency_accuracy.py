"""Benchmark: accuracy at equal measured latency — the latency-aware plan against uniform L2 pruning.

    python -m bench.latency_accuracy [--reduction 0.5] [--batch 64] [--weigh equal|layers|weights]
        [--seed 0] [--epochs 2] [--checkpoint CKPT] [--json OUT.json]

From the pretrained CIFAR-10 ResNet-20 (option A), one-shot: (a) the latency-aware plan for a
``1 / (1 − reduction)``x faster model on ONNX Runtime fp32 at ``--batch``, one thread (as
`bench.latency_plan`); (b) uniform layer-wise L2-magnitude pruning (the MACs-driven baseline,
``round_to`` 1) at the smallest ratio whose measured latency is at most the plan's (interleaved,
CPU clock, bisection on the ratio). Both are recovered the same way — the recovery of
``recipes/latency_resnet20.yaml`` (logit KD from the unpruned model, alpha 0.9, T 4, one round's
training: 2 epochs × 79 batches of 128 augmented CIFAR-10 JPEG images, SGD + cosine, seed 0) —
and evaluated on the 10,000 CIFAR-10 JPEG test images. ``--weigh`` is how the planner compares
groups (`spiralkit.latency.group_weights`); ``--checkpoint`` starts from another ResNet-20
checkpoint (e.g. the JPEG-fine-tuned baseline of ``recipes/cifar10_resnet20_finetune.yaml``).
Not a test; minutes of CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path
from typing import get_args

import torch

from spiralkit.data import load_data
from spiralkit.latency import GroupWeight, calibration_ms, choose_widths, interleaved_ms, table_for
from spiralkit.measure import count_macs
from spiralkit.models import load_model
from spiralkit.prune.apply import apply_plan
from spiralkit.prune.structured import StructuredPrune, planner
from spiralkit.spiral.recipe import load_recipe
from spiralkit.spiral.recovery import fitted_to
from spiralkit.tasks import evaluate
from spiralkit.train import train

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "latency_resnet20.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reduction", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--weigh", choices=get_args(GroupWeight), default=None,
                        help="how the planner compares groups (default: the recipe's group_weight)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the recovery (the plans do not depend on it)")
    parser.add_argument("--epochs", type=int, default=None, help="recovery epochs (default: the recipe's)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="start from this checkpoint instead")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    recipe = load_recipe(RECIPE)
    update: dict[str, object] = {"seed": args.seed}
    if args.checkpoint is not None:
        update["model"] = recipe.model.model_copy(update={"checkpoint": str(args.checkpoint)})
    if args.epochs is not None:
        update["recover"] = recipe.recover.model_copy(
            update={"train": recipe.recover.train.model_copy(update={"epochs": args.epochs})})
    recipe = recipe.model_copy(update=update)
    weigh = args.weigh or recipe.prune[0].group_weight or "equal"
    torch.manual_seed(0)
    teacher = load_model(recipe.model).eval()
    data = load_data(recipe.data, seed=recipe.seed)
    x = torch.randn(args.batch, 3, 32, 32)
    timing = {"clock": "cpu", "passes": 5}

    plan_for = planner(teacher, StructuredPrune(ratio=0.0), example=x)
    blocks, table = table_for(plan_for, teacher, x, runtime="ort", threads=1, step=8, clock="cpu")
    full_ms, narrow_ms = calibration_ms(teacher, plan_for, x, runtime="ort", threads=1, step=8, **timing)
    chosen = choose_widths(plan_for, blocks, table, target_ms=(1 - args.reduction) * full_ms, measured_ms=full_ms,
                           narrowest_ms=narrow_ms, step=8, weigh=weigh)
    aware = apply_plan(copy.deepcopy(teacher), chosen.plan, mode="remove")
    low, high, uniform = 0.0, 0.9, None
    for _ in range(7):  # the smallest uniform ratio at most as slow as the plan
        middle = (low + high) / 2
        candidate = apply_plan(copy.deepcopy(teacher), plan_for(middle), mode="remove")
        candidate_ms, reference_ms = interleaved_ms([(candidate, x), (aware, x)], runtime="ort", **timing)
        if candidate_ms <= reference_ms:
            high, uniform = middle, candidate
        else:
            low = middle
    assert uniform is not None, "no uniform ratio below 0.9 is as fast as the plan"
    models = {f"latency-aware plan ({weigh})": aware, f"uniform L2 (ratio {high:.3f})": uniform}
    ms = interleaved_ms([(m, x) for m in models.values()] + [(teacher, x)], runtime="ort", **timing)
    recover = fitted_to(recipe.recover, data.train)
    print(f"| model | MACs (batch 1) | ms @{args.batch} (ORT, CPU clock) | speed-up | test accuracy after recovery |")
    print("|---|---|---|---|---|")
    dense = evaluate(recipe.task, teacher, data.test).metric
    print(f"| dense | {count_macs(teacher, x[:1]):,} | {ms[-1]:.2f} | 1.00x | {dense:.2f} |", flush=True)
    rows = [{"model": "dense", "macs": count_macs(teacher, x[:1]), "ms": ms[-1], "accuracy": dense}]
    for (name, model), latency in zip(models.items(), ms):
        objective = recover.objective(task=recipe.task, teacher=teacher)
        train(model, data.train, config=recover.round_train(last=True), objective=objective, seed=recipe.seed,
              progress=False, description=name)
        accuracy = evaluate(recipe.task, model, data.test).metric
        print(f"| {name} | {count_macs(model, x[:1]):,} | {latency:.2f} | {ms[-1] / latency:.2f}x | {accuracy:.2f} |",
              flush=True)
        rows.append({"model": name, "macs": count_macs(model, x[:1]), "ms": latency, "accuracy": accuracy})
    if args.json is not None:
        args.json.write_text(json.dumps({"weigh": weigh, "seed": args.seed, "counts": chosen.counts,
                                         "predicted_ms": chosen.predicted_ms, "rows": rows}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("SPIRALKIT_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    main()
