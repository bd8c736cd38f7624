"""What ``spiral bench`` times: a run directory's models, or a model named as recipes name them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from spiralkit.bench.runtimes import BenchError
from spiralkit.data import load_data
from spiralkit.errors import ModelError
from spiralkit.models import load_model, load_weights
from spiralkit.models.loading import ModelSpec
from spiralkit.quant.compact import load_compressed
from spiralkit.spiral.export import pruned_model
from spiralkit.spiral.recipe import load_recipe
from spiralkit.spiral.rundir import BASELINE, MODEL, RECIPE, load_run_state

__all__ = ["Candidate", "INPUT_SHAPES", "input_shape_of", "model_candidates", "run_candidates"]

# Input shapes (without the batch) of the models a bare MODEL names; others need --input-shape.
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "lenet5": (1, 28, 28), "lenet300": (1, 28, 28), "mlp": (1, 28, 28),
    "resnet20": (3, 32, 32), "resnet56": (3, 32, 32),
    "cifar_resnet20": (3, 32, 32), "cifar_resnet32": (3, 32, 32),
    "cifar_resnet44": (3, 32, 32), "cifar_resnet56": (3, 32, 32),
    "torchvision:": (3, 224, 224),
    "timm:": (3, 224, 224),
}


@dataclass(frozen=True)
class Candidate:
    """One model to time.

    Attributes:
        name: How the table calls it (``baseline``, ``pruned``, ``final`` or the model's name).
        module: The PyTorch model, or None for a model that exists only as ONNX.
        onnx: An ``.onnx`` file to run instead of exporting ``module`` (a run's int8 artefact).
        float_model: For an ONNX-only int8 model, the float model it quantizes (its MACs are counted).
    """

    name: str
    module: nn.Module | None
    onnx: Path | None = None
    float_model: nn.Module | None = None


def input_shape_of(name: str, given: Sequence[int] | None) -> tuple[int, ...]:
    """The input shape (without the batch) to time model ``name`` on: ``given``, else `INPUT_SHAPES`.

    Raises:
        BenchError: No shape is given and the model is not in `INPUT_SHAPES`.
    """
    if given:
        return tuple(given)
    for key, shape in INPUT_SHAPES.items():
        if name == key or (key.endswith(":") and name.startswith(key)):
            return shape
    raise BenchError(f"no known input shape for model {name!r}: give one, e.g. --input-shape 3,224,224")


def model_candidates(name: str, checkpoint: Path | None) -> list[Candidate]:
    """Model ``name`` (a zoo name, ``torchvision:NAME``, ...) with ``checkpoint`` or its initial weights.

    ``package.module:function`` names are refused: benchmarking never imports code.

    Raises:
        BenchError: The name is unknown or imports code, or the checkpoint does not fit.
    """
    prefix, colon, _ = name.partition(":")
    if colon and prefix not in ("torchvision", "timm"):
        raise BenchError(f"model {name!r}: spiral bench builds zoo, torchvision and timm models only (no code imports)")
    try:
        return [Candidate(name, load_model(ModelSpec(name=name, checkpoint=checkpoint)))]
    except ModelError as exc:
        raise BenchError(str(exc)) from None


def run_candidates(run_dir: Path, *, allow_code: bool = False) -> tuple[list[Candidate], tuple[int, ...]]:
    """A run directory's baseline, pruned and final models, and the input shape of its data.

    The final model is the run's quantized artefact when it is an ``.onnx`` file (static or
    dynamic int8, QAT), the decoded compact artefact, or absent when the run did not quantize
    (the pruned model is then final).

    Raises:
        BenchError: ``run_dir`` holds no ``recipe.yaml`` or no ``baseline.safetensors``.
    """
    run_dir = Path(run_dir)
    if not (run_dir / RECIPE).is_file():
        raise BenchError(f"{run_dir} is not a run directory: it holds no {RECIPE}")
    if not (run_dir / BASELINE).is_file():
        raise BenchError(f"{run_dir} holds no trained baseline yet ({BASELINE} is missing)")
    recipe = load_recipe(run_dir / RECIPE)
    recipe.check_code(allow_code=allow_code)
    baseline = load_model(recipe.model.model_copy(update={"checkpoint": None}))
    load_weights(baseline, run_dir / BASELINE)
    candidates = [Candidate("baseline", baseline.eval())]
    state = load_run_state(run_dir)
    pruned = pruned_model(run_dir, recipe) if (run_dir / MODEL).is_file() else None
    if pruned is not None:
        candidates.append(Candidate("pruned", pruned))
    quantization = state.quantization
    if quantization is not None and state.final is not None:
        artefact = run_dir / quantization.artefact
        if artefact.suffix == ".onnx":
            candidates.append(Candidate("final", None, onnx=artefact, float_model=pruned))
        elif quantization.kind == "compact":
            candidates.append(Candidate("final", load_compressed(artefact).eval()))
    x, _ = next(iter(load_data(recipe.data, seed=recipe.seed).val))
    return candidates, tuple(x.shape[1:])
