"""The spiral's last stage: quantize the pruned model, falling back to QAT when PTQ loses too much.

Each config type is one way to quantize; :func:`quantize_stage` dispatches on it:

* ``CompactQuant`` — Deep Compression's weight quantization (Han et al. 2016): the non-zero
  weights on a b-bit uniform grid, saved as the compact artefact (sparse positions, packed
  codes, zstd). Post-training first; when the metric drops more than allowed, "trained
  quantization": recovery by distillation with the weights fake-quantized (straight-through
  estimator) and the pruning masks enforced, then quantized again.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import singledispatch
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.func import functional_call

from spiralkit.distill.recovery import Distill, recovery_objective
from spiralkit.export import atomic_write_text
from spiralkit.models import ModelSpec
from spiralkit.quant.affine import PerChannel, PerTensor
from spiralkit.quant.compact import save_compressed
from spiralkit.quant.mixed import choose_bits, sensitivity_scan
from spiralkit.quant.nonzero import fake_quantize_nonzero, quantize_nonzero_, weight_bits
from spiralkit.export.onnx import OrtModel
from spiralkit.qat_training import QATRecovery, qat
from spiralkit.quant.ptq import DynamicInt8, StaticInt8, quantize
from spiralkit.quant.qat import export_qat_onnx
from spiralkit.tasks import Classification, metric_drop
from spiralkit.train import Objective, OptimizerConfig, TrainConfig, Wrapped, train

Evaluate = Callable[[nn.Module], float]


class MixedBits(BaseModel):
    """Per-layer bit widths chosen from a sensitivity scan under a size budget.

    Each layer's weights are quantized alone to each candidate width and the validation
    metric measured; then the widths with the least summed metric loss whose non-zero
    weights fit ``average_bits`` per weight on average are chosen (an exact knapsack).

    Attributes:
        candidates: the widths to choose from (2..8).
        average_bits: the budget, in bits per non-zero weight over all quantized layers.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["mixed"] = "mixed"
    candidates: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    average_bits: float = Field(gt=0, le=8)


class CompactQuant(BaseModel):
    """Quantize the non-zero weights to ``bits`` and save the compact artefact.

    Attributes:
        bits: one width (2..8) for every Linear/Conv layer, layer name → bits, or
            ``{kind: mixed, average_bits: …}`` to choose them from a sensitivity scan.
        granularity: one scale per tensor or per output channel.
        exclude: layer name patterns kept in float.
        max_metric_drop: validation metric drop tolerated versus the *pruned* model before
            quantization-aware recovery is tried (``None``: the recipe's
            ``targets.max_metric_drop`` versus the dense baseline).
        qat: recovery used when post-training quantization drops too much (``None``: never).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["compact"] = "compact"
    bits: int | dict[str, int] | MixedBits = 5
    granularity: Literal["per-tensor", "per-channel"] = "per-tensor"
    exclude: tuple[str, ...] = ()
    max_metric_drop: float | None = Field(default=None, ge=0)
    qat: Distill | None = Distill(
        train=TrainConfig(epochs=2, optimizer=OptimizerConfig(name="sgd", lr=0.002, momentum=0.9))
    )




@dataclass(frozen=True)
class StageInputs:
    """What the quantize stage needs from the run."""

    spec: ModelSpec
    teacher: nn.Module
    task: Classification
    train_loader: object
    masks: Mapping[str, Tensor] | None
    evaluate: Evaluate  # validation metric of a model
    baseline_val: float  # validation metric of the dense model
    pruned_val: float  # validation metric of the pruned model, before quantization
    max_metric_drop: float  # the recipe's tolerance versus the dense model
    seed: int
    directory: Path
    example: Tensor  # an input batch, for ONNX export
    threads: int  # ONNX Runtime threads of the quantized model


@dataclass(frozen=True)
class Quantized:
    """The quantized model (evaluable like any module), its artefact, and how it was made."""

    model: nn.Module
    artefact: Path
    size_bytes: int
    method: Literal["ptq", "qat"]
    bits: dict[str, int]


def _granularity(name: str) -> PerTensor | PerChannel:
    return PerChannel(axis=0) if name == "per-channel" else PerTensor()


class _WithWeights(nn.Module):
    """Calls ``model`` with some parameters replaced (functional call, nothing mutated)."""

    def __init__(self, model: nn.Module, weights: dict[str, Tensor]) -> None:
        super().__init__()
        self.model = model
        self.weights = weights

    def forward(self, x: Tensor) -> Tensor:
        return functional_call(self.model, self.weights, (x,))


def fake_quant_objective(base: Objective, bits: Mapping[str, int], *, granularity: PerTensor | PerChannel) -> Objective:
    """``base`` evaluated with the named weights fake-quantized (straight-through gradients)."""

    def around(inner: Objective, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        params = dict(model.named_parameters())
        weights = {n: fake_quantize_nonzero(params[n], b, granularity=granularity, name=n) for n, b in bits.items()}
        return inner(_WithWeights(model, weights), x, y)

    return Wrapped(base, around)


def _mixed_bits(config: CompactQuant, model: nn.Module, inputs: StageInputs) -> dict[str, int]:
    """Scan per-layer sensitivity on the validation split, then pick widths under the budget."""
    assert isinstance(config.bits, MixedBits)
    layers = [name.removesuffix(".weight") for name, b in weight_bits(model, 8, config.exclude).items() if b]
    table = sensitivity_scan(model, evaluate=inputs.evaluate, layers=layers, bits=config.bits.candidates,
                             granularity=_granularity(config.granularity))
    modules = dict(model.named_modules())
    nonzero = {name: int(modules[name].weight.count_nonzero()) for name in layers}
    budget = math.floor(sum(nonzero.values()) * config.bits.average_bits / 8)
    atomic_write_text(inputs.directory / "sensitivity.json", table.to_json() + "\n")
    return choose_bits(table, size_of=nonzero, budget_bytes=budget, higher_is_better=inputs.task.higher_is_better)


def _acceptable(value: float, max_drop: float | None, inputs: StageInputs) -> bool:
    """Within ``max_drop`` of the pruned model, or (``None``) within the recipe's tolerance of the dense one."""
    if max_drop is None:
        return metric_drop(inputs.task, baseline=inputs.baseline_val, value=value) <= inputs.max_metric_drop
    return metric_drop(inputs.task, baseline=inputs.pruned_val, value=value) <= max_drop


@singledispatch
def quantize_stage(config: object, model: nn.Module, inputs: StageInputs) -> Quantized:
    """Quantize ``model`` (not modified) as ``config`` says."""
    raise TypeError(f"unknown quantize stage {type(config).__name__}")


@quantize_stage.register
def _(config: CompactQuant, model: nn.Module, inputs: StageInputs) -> Quantized:
    granularity = _granularity(config.granularity)
    chosen = _mixed_bits(config, model, inputs) if isinstance(config.bits, MixedBits) else config.bits
    param_bits = {n: b for n, b in weight_bits(model, chosen, config.exclude).items() if b is not None}
    bits = {n.removesuffix(".weight"): b for n, b in param_bits.items()}  # by layer name
    quantized = copy.deepcopy(model)
    quantize_nonzero_(quantized, bits, granularity=granularity)
    method: Literal["ptq", "qat"] = "ptq"
    ptq_metric = inputs.evaluate(quantized)
    if not _acceptable(ptq_metric, config.max_metric_drop, inputs) and config.qat is not None:
        trained = copy.deepcopy(model)
        objective = fake_quant_objective(
            recovery_objective(config.qat, task=inputs.task, teacher=inputs.teacher), param_bits, granularity=granularity
        )
        train(trained, inputs.train_loader, config=config.qat.train, objective=objective, seed=inputs.seed,
              masks=inputs.masks, progress=True, description="quantization-aware recovery")
        quantize_nonzero_(trained, bits, granularity=granularity)
        if metric_drop(inputs.task, baseline=ptq_metric, value=inputs.evaluate(trained)) < 0:  # QAT only if it helped
            quantized, method = trained, "qat"
    path = inputs.directory / "model.spkc"
    size = save_compressed(quantized, path, spec=inputs.spec, bits=bits, granularity=granularity)
    return Quantized(model=quantized.eval(), artefact=path, size_bytes=size, method=method, bits=bits)


class StaticInt8Stage(StaticInt8):
    """Static int8 as the spiral's last stage, with quantization-aware training as the fallback.

    Attributes:
        max_metric_drop: validation drop tolerated versus the pruned model (``None``: the
            recipe's ``targets.max_metric_drop`` versus the dense model).
        qat: 8-bit quantization-aware training with distillation, exported as ONNX QDQ,
            used when post-training quantization drops more than that (``None``: never).
    """

    max_metric_drop: float | None = Field(default=None, ge=0)
    qat: QATRecovery | None = None


QuantizeStage = Annotated[CompactQuant | StaticInt8Stage | DynamicInt8, Field(discriminator="kind")]


@quantize_stage.register(StaticInt8)
@quantize_stage.register(DynamicInt8)
def _(config: StaticInt8 | DynamicInt8, model: nn.Module, inputs: StageInputs) -> Quantized:
    result = quantize(model, config, inputs.train_loader, example=inputs.example,  # type: ignore[arg-type]
                      workdir=inputs.directory / "int8", threads=inputs.threads)
    bits = {name: 8 for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d, nn.LSTM))}
    ptq = Quantized(model=result.model, artefact=result.path, size_bytes=result.size_bytes, method="ptq", bits=bits)
    if not isinstance(config, StaticInt8Stage) or config.qat is None:
        return ptq
    ptq_metric = inputs.evaluate(ptq.model)
    if _acceptable(ptq_metric, config.max_metric_drop, inputs):
        return ptq
    trained = qat(model, config.qat, inputs.train_loader, task=inputs.task, teacher=inputs.teacher,  # type: ignore[arg-type]
                  seed=inputs.seed, progress=True)
    path = export_qat_onnx(trained, inputs.example, inputs.directory / "int8" / "model.qat.onnx")
    candidate = OrtModel(path, threads=inputs.threads)
    if metric_drop(inputs.task, baseline=ptq_metric, value=inputs.evaluate(candidate)) >= 0:
        return ptq  # QAT did not help: keep the post-training model
    return Quantized(model=candidate, artefact=path, size_bytes=path.stat().st_size, method="qat", bits=bits)
