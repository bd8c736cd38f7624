"""Benchmark: a DepGraph-scale result — spiralkit's spiral against Torch-Pruning's own pruner.

    python -m bench.depgraph_resnet56 --spiral runs/depgraph_resnet56 [--json out.json]
    # or Torch-Pruning's row first, beside the running spiral (its baseline is enough):
    python -m bench.depgraph_resnet56 --spiral runs/depgraph_resnet56 --macs 47684564 --epochs 16 \
        --torch-pruning runs/depgraph_tp.safetensors
    python -m bench.depgraph_resnet56 --spiral runs/depgraph_resnet56 --torch-pruning runs/depgraph_tp.safetensors

DepGraph (Fang et al. 2023) reports ResNet-56 on CIFAR-10 93.53% → 93.64% at 2.57x fewer
MACs after 100+ GPU epochs. Here, on the JPEG copy of CIFAR-10 and a CPU budget, both rows
start from the same baseline (the run's ``baseline.safetensors``) and get the same recovery
budget, data and optimizer (``recover.train`` of ``recipes/depgraph_resnet56_cifar10.yaml``):

* **spiralkit**: the finished run of that recipe (``--spiral RUN_DIR``): AGP rounds of
  structured L2-magnitude pruning of every channel group, the residual stream included,
  each recovered by logit distillation;
* **Torch-Pruning**: ``tp.pruner.MetaPruner`` with ``GroupMagnitudeImportance(p=2)`` (its
  group magnitude), one shot, at the channel ratio whose MACs are at most the spiral's final
  MACs (bisection), then fine-tuning on labels for as many epochs as the spiral's rounds
  recovered in all. Plain Torch-Pruning cannot trace the option-A zero-padded shortcut
  (its index map breaks when the residual stream narrows), so it prunes the inner channels
  of every block (each block's first convolution), as DepGraph-era code does with option-A
  nets; the stem, each block's second convolution and the classifier are left whole.

For each model: test and validation accuracy, MACs, parameters, and ONNX Runtime latency at
batch 1 and 64 (one thread, interleaved, medians). With the recipe's 16 epochs (bf16 on a bf16 CPU),
Torch-Pruning's row takes ~1 h on one core of this 2-core machine (the fine-tune dominates;
the spiral ~2 h on the other). A script, not a test.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from spiralkit.data import load_data
from spiralkit.export import load_state, save_weights
from spiralkit.export.onnx import OrtModel, export_onnx
from spiralkit.graph.tp import torch_pruning_prune
from spiralkit.measure import count_macs, count_params, measure_latency
from spiralkit.models import load_model
from spiralkit.modules import torch_threads
from spiralkit.report import Report
from spiralkit.spiral.export import pruned_model
from spiralkit.spiral.recipe import Recipe, load_recipe
from spiralkit.spiral.rundir import BASELINE, REPORT_JSON
from spiralkit.tasks import evaluate
from spiralkit.train import supervised, train

from bench.common import format_table

RECIPE = Path("recipes/depgraph_resnet56_cifar10.yaml")
BATCHES = (1, 64)


def _inner_convolutions_only(model: nn.Module) -> list[nn.Module]:
    """Layers Torch-Pruning must leave whole: everything that writes the residual stream, and the classifier."""
    blocks = [block for name in ("layer1", "layer2", "layer3") for block in model.get_submodule(name)]
    return [model.get_submodule("conv1"), model.get_submodule("linear"), *(b.conv2 for b in blocks)]


def torch_pruning_at(model: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    """A copy of ``model`` pruned by Torch-Pruning's MetaPruner (group L2 magnitude) at ``ratio``."""
    pruned = copy.deepcopy(model)
    return torch_pruning_prune(pruned, example, ratio=ratio, ignored=_inner_convolutions_only(pruned))


def torch_pruning_to_macs(model: nn.Module, example: torch.Tensor, *, macs: int, steps: int = 7) -> tuple[nn.Module, float]:
    """Torch-Pruning's model with at most ``macs`` MACs, at the smallest such ratio (bisection)."""
    low, high = 0.0, 0.95
    best = torch_pruning_at(model, example, high)
    if count_macs(best, example) > macs:
        raise SystemExit(f"Torch-Pruning cannot reach {macs:,} MACs on the inner channels alone")
    for _ in range(steps):
        middle = (low + high) / 2
        candidate = torch_pruning_at(model, example, middle)
        if count_macs(candidate, example) <= macs:
            high, best = middle, candidate
        else:
            low = middle
    return best, high


def latencies(models: dict[str, nn.Module], example: torch.Tensor, *, repeats: int) -> dict[str, dict[int, float]]:
    """ONNX Runtime medians (ms, one thread) of each model at each batch size, interleaved."""
    times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in BATCHES} for name in models}
    with tempfile.TemporaryDirectory() as directory:
        sessions = {name: OrtModel(export_onnx(m.eval(), example, Path(directory) / f"{name}.onnx"), threads=1)
                    for name, m in models.items()}
        for _ in range(repeats):  # round-robin, so drift on a shared machine hits every model alike
            for batch in BATCHES:
                inputs = example.expand(batch, *example.shape[1:]).contiguous()
                for name, session in sessions.items():
                    times[name][batch].append(measure_latency(session, inputs, warmup=2, repeats=5).median_ms)
    return {name: {b: statistics.median(v) for b, v in per.items()} for name, per in times.items()}


def _finetune_epochs(run_dir: Path, recipe: Recipe) -> int:
    report = Report.from_json((run_dir / REPORT_JSON).read_text())
    return sum(recipe.recover.train.epochs if r.epochs is None else r.epochs for r in report.rounds)


def train_torch_pruning(baseline: nn.Module, data, recipe: Recipe, example: torch.Tensor, *, macs: int, epochs: int) -> tuple[nn.Module, float]:
    """Torch-Pruning's model at ``macs`` (bisection on its ratio), fine-tuned ``epochs`` epochs on labels."""
    started = time.perf_counter()
    theirs, ratio = torch_pruning_to_macs(baseline.eval(), example, macs=macs)
    print(f"Torch-Pruning: ratio {ratio:.4f} in {time.perf_counter() - started:.0f} s; fine-tuning {epochs} epochs")
    torch.manual_seed(recipe.seed)
    config = recipe.recover.train.model_copy(update={"epochs": epochs})
    train(theirs, data.train, config=config, objective=supervised(recipe.task.loss), seed=recipe.seed,
          progress=True, description="torch-pruning fine-tune")
    return theirs, ratio


def save_torch_pruning(model: nn.Module, ratio: float, epochs: int, path: Path) -> None:
    """Weights as safetensors plus the ratio that rebuilds the architecture (re-pruning is deterministic)."""
    save_weights(model, path)
    path.with_suffix(".json").write_text(json.dumps({"ratio": ratio, "epochs": epochs}) + "\n")


def load_torch_pruning(baseline: nn.Module, example: torch.Tensor, path: Path) -> tuple[nn.Module, float, int]:
    meta = json.loads(path.with_suffix(".json").read_text())
    ratio = meta["ratio"] if "ratio" in meta else meta["torch_pruning_ratio"]  # or this script's --json output
    model = torch_pruning_at(baseline.eval(), example, ratio)
    model.load_state_dict(load_state(path))
    return model, ratio, meta["epochs"]


def compare(models: dict[str, nn.Module], recipe: Recipe, data, example: torch.Tensor, *, repeats: int) -> list[dict]:
    """Accuracy, MACs, parameters and ONNX Runtime latency of each model, as rows and a printed table."""
    with torch_threads(recipe.threads):
        accuracy = {name: (evaluate(recipe.task, m, data.test).metric, evaluate(recipe.task, m, data.val).metric)
                    for name, m in models.items()}
    speed = latencies(models, example, repeats=repeats)
    base_macs = count_macs(models["baseline"], example)
    rows, table = [], []
    for name, model in models.items():
        macs = count_macs(model, example)
        row = {"method": name, "test": accuracy[name][0], "val": accuracy[name][1], "macs": macs,
               "macs_reduction": base_macs / macs, "params": count_params(model).total,
               **{f"ort_ms_b{b}": speed[name][b] for b in BATCHES},
               **{f"speedup_b{b}": speed["baseline"][b] / speed[name][b] for b in BATCHES}}
        rows.append(row)
        table.append([name, f"{row['test']:.2f}", f"{row['val']:.2f}", f"{macs / 1e6:.1f}M", f"{row['macs_reduction']:.2f}x",
                      f"{row['params']:,}", *(f"{speed[name][b]:.2f} ({row[f'speedup_b{b}']:.2f}x)" for b in BATCHES)])
    print(format_table(["model", "test", "val", "MACs", "fewer", "params", "ORT ms b1", "ORT ms b64"], table))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spiral", type=Path, required=True, help="the run of the recipe (finished, or only its baseline with --macs)")
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--macs", type=int, help="train only Torch-Pruning's row at this MACs budget (before the spiral ends)")
    parser.add_argument("--epochs", type=int, help="with --macs: its fine-tuning epochs")
    parser.add_argument("--torch-pruning", type=Path, dest="tp_weights",
                        help="with --macs: save its model here; otherwise: load it from here instead of training")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    recipe = load_recipe(args.recipe)
    with torch_threads(recipe.threads):
        data = load_data(recipe.data, seed=recipe.seed)
        example = next(iter(data.val))[0][:1]
        baseline = load_model(recipe.model.model_copy(update={"checkpoint": None}))
        baseline.load_state_dict(load_state(args.spiral / BASELINE))
        if args.macs is not None:
            if args.epochs is None or args.tp_weights is None:
                raise SystemExit("--macs needs --epochs and --torch-pruning FILE")
            theirs, ratio = train_torch_pruning(baseline, data, recipe, example, macs=args.macs, epochs=args.epochs)
            save_torch_pruning(theirs, ratio, args.epochs, args.tp_weights)
            print(f"saved {args.tp_weights}")
            return
        spiral = pruned_model(args.spiral, recipe)
        epochs = _finetune_epochs(args.spiral, recipe)
        if args.tp_weights is not None:
            theirs, ratio, their_epochs = load_torch_pruning(baseline, example, args.tp_weights)
            if their_epochs != epochs:
                print(f"warning: Torch-Pruning was fine-tuned {their_epochs} epochs, the spiral recovered {epochs}")
        else:
            theirs, ratio = train_torch_pruning(baseline, data, recipe, example, macs=count_macs(spiral, example), epochs=epochs)
    rows = compare({"baseline": baseline, "spiralkit": spiral, "torch_pruning": theirs}, recipe, data, example, repeats=args.repeats)
    if args.json:
        args.json.write_text(json.dumps({"torch_pruning_ratio": ratio, "epochs": epochs, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
