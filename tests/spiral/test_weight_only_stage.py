"""The ``weight-only`` quantize stage: int4 weights as ONNX Runtime's MatMulNBits, measured and exported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from spiralkit.errors import RecipeError
from spiralkit.quant.ort import MATMUL_NBITS, optimized_ops
from spiralkit.spiral.export import export_run
from spiralkit.spiral.recipe import parse_recipe
from spiralkit.spiral.runner import Spiral
from tests.spiral.tiny import TINY


@pytest.mark.slow  # a spiral run and an ONNX export: ~10 s, more on a loaded machine
def test_a_weight_only_int4_run_measures_and_exports_the_matmul_nbits_model(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    Spiral(parse_recipe(TINY + "quantize: {kind: weight-only, bits: 4, group_size: 16}\n")).run(
        run_dir, console=Console(quiet=True))
    state = json.loads((run_dir / "state.json").read_text())
    assert state["quantization"]["kind"] == "weight-only"
    assert state["quantization"]["artefact"] == "model.weight-only.onnx"
    assert set(state["quantization"]["bits"].values()) == {4}
    assert optimized_ops(run_dir / "model.weight-only.onnx")[MATMUL_NBITS] == 2  # the MLP's two Linear layers
    exported = export_run(run_dir)
    assert exported.note.startswith("the weight-only int4 model model.weight-only.onnx (MatMulNBits)")
    assert exported.path.read_bytes() == (run_dir / "model.weight-only.onnx").read_bytes()
    assert exported.check.cosine > 0.99  # against the float pruned model: close, not equal


@pytest.mark.parametrize(("fragment", "message"), [
    ("{kind: weight-only, bits: 4, group_size: 24}",
     r"r\.yaml, line 13: key 'quantize\.group_size': ONNX Runtime's MatMulNBits needs groups of a power-of-two size "
     r">= 16 \(e\.g\. 32\), got 24"),
    ("{kind: weight-only, bits: 8}", "key 'quantize.group_size': .* got none \\(per channel\\)"),
    ("{kind: weight-only, bits: 4, exclude: [head]}", "key 'quantize.exclude': pattern 'head' matches no Linear/Conv2d"),
])
def test_settings_matmul_nbits_cannot_run_fail_before_training(fragment: str, message: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(RecipeError, match=message):
        Spiral(parse_recipe(TINY + f"quantize: {fragment}\n", source="r.yaml")).run(run_dir, console=Console(quiet=True))
    assert not (run_dir / "baseline.safetensors").exists()
