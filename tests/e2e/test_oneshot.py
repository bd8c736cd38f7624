"""One-shot calibration methods through the CLI: a Wanda 2:4 step + distillation, then GPTQ weight-only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from spiralkit.cli import app
from spiralkit.export import load_state
from spiralkit.prune import NM, check_nm, load_masks
from spiralkit.quant.weight_only import WeightOnlyLinear, load_weight_only
from spiralkit.spiral.export import pruned_model
from spiralkit.spiral.recipe import load_recipe

ONESHOT = """\
name: oneshot
seed: 3
threads: 1
model: {name: mlp, kwargs: {in_features: 64, widths: [64]}}
data: {name: digits, batch_size: 32, val_fraction: 0.2}
train: {epochs: 6, optimizer: {name: adam, lr: 0.01}}
prune:
  criterion: {kind: wanda, samples: 64}
  pattern: {n: 2, m: 4}
recover: {kind: distill, train: {epochs: 1, optimizer: {name: sgd, lr: 0.02, weight_decay: 0.01}}}
quantize: {kind: weight-only, method: gptq, bits: 4, group_size: 16, samples: 64}
targets: {max_metric_drop: 20.0, max_rounds: 2}
measure: {repeats: 3, warmup: 1}
"""


@pytest.mark.slow
def test_wanda_nm_step_with_distillation_then_gptq(tmp_path: Path) -> None:
    recipe = tmp_path / "oneshot.yaml"
    recipe.write_text(ONESHOT)
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(recipe), "--out", str(run)])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "report.json").read_text())
    assert report["rounds"][0]["accepted"] and report["quantization"]["kind"] == "weight-only"
    pattern = NM(n=2, m=4)
    masks = load_masks(run / "rounds" / "001" / "masks.packed.safetensors")
    assert set(masks) == {"fc1.weight", "fc2.weight"}
    state = load_state(run / "model.safetensors")
    for name, mask in masks.items():
        check_nm(mask, pattern, name=name)
        assert int(mask.sum()) * 2 == mask.numel()
        check_nm(state[name] != 0, pattern, name=name)  # the recovered weights kept the pattern
        assert bool((state[name][~mask] == 0).all())
    model = load_weight_only(run / "model.weight-only.safetensors", pruned_model(run, load_recipe(run / "recipe.yaml")))
    layers = [m for m in model.modules() if isinstance(m, WeightOnlyLinear)]
    assert len(layers) == 2
    for layer in layers:  # GPTQ kept the pruned weights at code 0
        check_nm(layer.weight != 0, pattern, name="quantized")
    exported = CliRunner().invoke(app, ["export", str(run), "--format", "onnx"])
    assert exported.exit_code == 0, exported.output
    assert "weight-only" in " ".join(exported.output.split())
    assert torch.isfinite(torch.tensor(report["final"]["metric"]))


def test_a_sparsity_contradicting_the_pattern_names_the_key_and_line(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(ONESHOT.replace("  pattern: {n: 2, m: 4}\n", "  pattern: {n: 2, m: 4}\n  target_sparsity: 0.7\n"))
    result = CliRunner().invoke(app, ["run", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code != 0
    assert "line 7" in result.output and "target_sparsity 0.7 contradicts pattern 2:4" in " ".join(result.output.split())


def test_a_gptq_exclude_matching_nothing_names_the_key(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(ONESHOT.replace("samples: 64}\ntargets", "samples: 64, exclude: [head]}\ntargets"))
    result = CliRunner().invoke(app, ["run", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code != 0
    assert "quantize.exclude" in result.output and "pattern 'head' matches no Linear/Conv2d layer" in \
        " ".join(result.output.split())


def test_a_pattern_that_does_not_fit_a_layer_is_refused_before_training(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(ONESHOT.replace("pattern: {n: 2, m: 4}", "pattern: {n: 2, m: 5}"))
    result = CliRunner().invoke(app, ["run", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code != 0
    text = " ".join(result.output.split())
    assert "key 'prune.0.pattern'" in text and "layer 'fc1': its 64 input columns are not a multiple of m=5" in text
    assert not (tmp_path / "run" / "baseline.safetensors").exists()  # nothing was trained
