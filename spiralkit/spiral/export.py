"""``spiral export``: the model a finished run's report calls final, as a verified ONNX file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from spiralkit.data import load_data
from spiralkit.errors import SpiralError
from spiralkit.export import atomic_write_bytes
from spiralkit.export.onnx import OrtModel, VerifyResult, compare_outputs, export_onnx, verify_onnx
from spiralkit.models import load_model, load_weights
from spiralkit.prune.students import apply_student, read_layout
from spiralkit.prune.apply import replay_plans
from spiralkit.prune.plan import read_plans
from spiralkit.quant.compact import load_compressed
from spiralkit.quant.weight_only import load_weight_only
from spiralkit.spiral.context import example_input
from spiralkit.spiral.recipe import Recipe, load_recipe
from spiralkit.spiral.rundir import MODEL, ONNX, PLANS, RECIPE, STUDENT_LAYOUT, RunState, load_run_state

__all__ = ["Exported", "export_run", "pruned_model"]

_EXAMPLES = 8


@dataclass(frozen=True)
class Exported:
    """What ``spiral export`` wrote.

    Attributes:
        path: the ``.onnx`` file.
        check: how ONNX Runtime's outputs agree with the PyTorch model it stands for.
        note: what was exported and against what it was checked, in a sentence.
    """

    path: Path
    check: VerifyResult
    note: str


def pruned_model(run_dir: Path, recipe: Recipe) -> nn.Module:
    """The run's pruned float model: the recipe's architecture, student layout and plans, with ``model.safetensors``."""
    model = load_model(recipe.model.model_copy(update={"checkpoint": None}))
    if (run_dir / STUDENT_LAYOUT).exists():
        apply_student(model, read_layout(run_dir / STUDENT_LAYOUT))
    if (run_dir / PLANS).exists():
        replay_plans(model, read_plans(run_dir / PLANS))
    load_weights(model, run_dir / MODEL)
    return model.eval()


def _finished(run_dir: Path) -> RunState:
    state = load_run_state(run_dir)
    if state.final is None:
        where = "quantization" if (run_dir / MODEL).exists() else "its rounds"
        raise SpiralError(f"{run_dir} holds no finished run (it stopped during {where}): "
                          f"resume it with `spiral run --resume {run_dir}` first")
    return state


def export_run(run_dir: Path, *, allow_code: bool = False) -> Exported:
    """Export the model a finished run's report calls final to ``RUN_DIR/model.onnx``, verified.

    * no quantize stage: the pruned model, exported and checked against PyTorch;
    * ``static-int8`` / ``dynamic-int8``: the int8 ONNX model the run measured (what the report's
      final row is), copied, and compared with the pruned float model it came from;
    * ``weight-only``: likewise its ONNX file, whose Linear layers are ``MatMulNBits`` nodes
      (``runtime: pytorch``: the reloaded codes, dequantized in the graph);
    * ``compact``: ONNX has no b-bit weights, so the compact artefact's decoded weights are
      exported in float, and checked against the decoded model.

    Args:
        run_dir: the run directory.
        allow_code: the run's recipe may name code to import (``package.module:function``);
            off by default, since run directories come from others.

    Raises:
        SpiralError: the directory holds no finished run (a run killed during quantization
            included), or a file is missing; `RecipeError` when its recipe names code and
            ``allow_code`` is off.
    """
    run_dir = Path(run_dir)
    if not (run_dir / RECIPE).exists():
        raise SpiralError(f"{run_dir} is not a run directory: it holds no {RECIPE}")
    state = _finished(run_dir)
    recipe = load_recipe(run_dir / RECIPE)
    recipe.check_code(allow_code=allow_code)
    example = example_input(load_data(recipe.data, seed=recipe.seed), _EXAMPLES)
    quantization = state.quantization
    if quantization is not None and quantization.kind == "compact":
        decoded = load_compressed(run_dir / quantization.artefact)
        path = export_onnx(decoded, example, run_dir / ONNX)
        return Exported(path, verify_onnx(decoded, path, example),
                        f"the decoded {quantization.artefact} weights in float (ONNX has no "
                        f"{max(quantization.bits.values(), default=8)}-bit weight type), checked against the decoded model")
    model = pruned_model(run_dir, recipe)
    if quantization is not None and quantization.kind == "weight-only" and not quantization.artefact.endswith(".onnx"):
        quantized = load_weight_only(run_dir / quantization.artefact, model).eval()
        path = export_onnx(quantized, example, run_dir / ONNX)
        return Exported(path, verify_onnx(quantized, path, example),
                        f"the weight-only model {quantization.artefact} (codes dequantized in the graph), "
                        "checked against the reloaded weight-only model")
    if quantization is not None:
        artefact = run_dir / quantization.artefact
        path = run_dir / ONNX
        atomic_write_bytes(path, artefact.read_bytes())
        with torch.no_grad():
            check = compare_outputs(model(example), OrtModel(path)(example))
        what = (f"the weight-only int{max(quantization.bits.values(), default=4)} model {quantization.artefact} "
                "(MatMulNBits)" if quantization.kind == "weight-only"
                else f"the int8 model {quantization.artefact} ({quantization.method})")
        return Exported(path, check, f"{what}, compared with the float pruned model it quantizes")
    path = export_onnx(model, example, run_dir / ONNX)
    return Exported(path, verify_onnx(model, path, example), "the pruned model, checked against PyTorch")
