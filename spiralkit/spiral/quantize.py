"""The spiral's last stage: quantize the pruned model, falling back to QAT when PTQ loses too much.

Each stage kind is one config class whose `run` method quantizes (`QuantizeStageKind`),
listed in `QUANTIZE_STAGES`:

* ``CompactQuant`` — Deep Compression's weight quantization (Han et al. 2016): the non-zero
  weights on a b-bit uniform grid, saved as the compact artefact (sparse positions, packed
  codes, zstd). Post-training first; when the metric drops more than allowed, "trained
  quantization": recovery by distillation with the weights fake-quantized (straight-through
  estimator) and the pruning masks enforced, then quantized again.
* ``StaticInt8Stage`` / ``DynamicInt8Stage`` — int8 on ONNX Runtime's integer kernels.
* ``WeightOnlyStage`` — weight-only int8/int4/int3 codes with per-group scales, by
  round-to-nearest or GPTQ (calibrated layer by layer on training examples, no training);
  pruned weights stay zero. Saved as ``model.weight-only.safetensors``; run by ONNX Runtime's
  ``MatMulNBits`` from ``model.weight-only.onnx`` (`spiralkit.quant.ort`), or in PyTorch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn
from torch.func import functional_call

from spiralkit.configs import KindTable, by_kind
from spiralkit.errors import ConfigError
from spiralkit.export import atomic_write_text
from spiralkit.parallel import SINGLE, World
from spiralkit.patterns import first_unmatched
from spiralkit.spiral.recovery import Distill
from spiralkit.spiral.rundir import COMPACT, INT8_DIR, QAT_ONNX, SENSITIVITY, WEIGHT_ONLY, WEIGHT_ONLY_ONNX
from spiralkit.models import ModelSpec
from spiralkit.quant.affine import PerChannel, PerTensor, QuantError, check_bits
from spiralkit.quant.compact import save_compressed
from spiralkit.quant.gptq import GPTQConfig, quantize_gptq_
from spiralkit.quant.weight_only import WeightOnlyConfig, default_group_size, quantize_weights_, save_weight_only
from spiralkit.quant.mixed import choose_bits, sensitivity_scan
from spiralkit.quant.nonzero import fake_quantize_nonzero, quantize_nonzero_, weight_bits
from spiralkit.export.onnx import OrtModel
from spiralkit.spiral.qat import QATRecovery, qat
from spiralkit.quant.ptq import DynamicInt8, StaticInt8, quantize
from spiralkit.quant.qat import export_qat_onnx
from spiralkit.quant.ort import export_weight_only_onnx
from spiralkit.tasks import Classification, metric_drop, within_tolerance
from spiralkit.train import EpochCheckpoint, NonFiniteLoss, Objective, OptimizerConfig, TrainConfig, Wrapped, train

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

    @field_validator("candidates")
    @classmethod
    def _bits_in_range(cls, candidates: tuple[int, ...]) -> tuple[int, ...]:
        for value in candidates:
            _valid_bits(value)
        return candidates


def _valid_bits(bits: int) -> None:
    """Raise ``ValueError`` (a recipe error at the key) for a width outside 2..8."""
    try:
        check_bits(bits)
    except QuantError as exc:
        raise ValueError(str(exc)) from None


def _check_keep_float(model: nn.Module, keep_float: tuple[str, ...]) -> None:
    """Every ``keep_float`` pattern names a module of ``model``."""
    names = [name for name, _ in model.named_modules() if name]
    if (pattern := first_unmatched(keep_float, names)) is not None:
        raise ConfigError("keep_float", f"pattern {pattern!r} matches no module; modules are: {', '.join(names[:20])}"
                          + (" …" if len(names) > 20 else ""))


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

    @field_validator("bits")
    @classmethod
    def _bits_in_range(cls, bits: int | dict[str, int] | MixedBits) -> int | dict[str, int] | MixedBits:
        for value in (bits.values() if isinstance(bits, dict) else [bits] if isinstance(bits, int) else []):
            _valid_bits(value)
        return bits

    def run(self, model: nn.Module, inputs: StageInputs) -> Quantized:
        """Quantize ``model`` (not modified) and save the compact artefact."""
        return _run_compact(self, model, inputs)

    def check(self, model: nn.Module, example: Tensor) -> None:
        """The ``bits`` keys and ``exclude`` patterns name Linear/Conv layers of ``model``."""
        bits = 8 if isinstance(self.bits, MixedBits) else self.bits
        try:
            weight_bits(model, bits, self.exclude)
        except QuantError as exc:
            raise ConfigError.naming(exc, exclude=self.exclude, bits=list(bits) if isinstance(bits, dict) else []) from None




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
    world: World = SINGLE  # the data-parallel processes that run quantization-aware training together
    checkpoint: EpochCheckpoint | None = None  # where quantization-aware training saves each epoch


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
    atomic_write_text(inputs.directory / SENSITIVITY, table.to_json() + "\n")
    return choose_bits(table, size_of=nonzero, budget_bytes=budget, higher_is_better=inputs.task.higher_is_better)


def _acceptable(value: float, max_drop: float | None, inputs: StageInputs) -> bool:
    """Within ``max_drop`` of the pruned model, or (``None``) within the recipe's tolerance of the dense one."""
    if max_drop is None:
        return within_tolerance(inputs.task, baseline=inputs.baseline_val, value=value, tolerance=inputs.max_metric_drop)
    return within_tolerance(inputs.task, baseline=inputs.pruned_val, value=value, tolerance=max_drop)


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

    def run(self, model: nn.Module, inputs: StageInputs) -> Quantized:
        """Quantize ``model`` (not modified) to an int8 ONNX Runtime model, with the QAT fallback."""
        return _int8_qat_fallback(self, model, inputs, _int8_ptq(self, model, inputs))

    def check(self, model: nn.Module, example: Tensor) -> None:
        """The ``keep_float`` patterns (and the QAT fallback's) name modules of ``model``."""
        _check_keep_float(model, self.keep_float)
        if self.qat is not None:
            try:
                _check_keep_float(model, self.qat.keep_float)
            except ConfigError as exc:
                raise ConfigError(f"qat.{exc.key}", str(exc)) from None




def _int8_ptq(config: StaticInt8 | DynamicInt8, model: nn.Module, inputs: StageInputs) -> Quantized:
    """Post-training int8 on ONNX Runtime's integer kernels."""
    result = quantize(model, config, inputs.train_loader, example=inputs.example,  # type: ignore[arg-type]
                      workdir=inputs.directory / INT8_DIR, threads=inputs.threads)
    bits = {name: 8 for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d, nn.LSTM))}
    return Quantized(model=result.model, artefact=result.path, size_bytes=result.size_bytes, method="ptq", bits=bits)


def _int8_qat_fallback(config: StaticInt8Stage, model: nn.Module, inputs: StageInputs, ptq: Quantized) -> Quantized:
    """The post-training model, or the QAT model when PTQ lost too much and QAT did better."""
    if config.qat is None:
        return ptq
    ptq_metric = inputs.evaluate(ptq.model)
    if _acceptable(ptq_metric, config.max_metric_drop, inputs):
        return ptq
    try:
        trained = qat(model, config.qat, inputs.train_loader, task=inputs.task, teacher=inputs.teacher,  # type: ignore[arg-type]
                      seed=inputs.seed, progress=True, world=inputs.world, checkpoint=inputs.checkpoint)
    except NonFiniteLoss:
        return ptq  # QAT diverged: the post-training model stands
    path = export_qat_onnx(trained, inputs.example, inputs.directory / INT8_DIR / QAT_ONNX)
    candidate = OrtModel(path, threads=inputs.threads)
    if metric_drop(inputs.task, baseline=ptq_metric, value=inputs.evaluate(candidate)) >= 0:
        return ptq  # QAT did not help: keep the post-training model
    return Quantized(model=candidate, artefact=path, size_bytes=path.stat().st_size, method="qat", bits=ptq.bits)


class DynamicInt8Stage(DynamicInt8):
    """Dynamic int8 (weights int8, activations quantized at run time) as the spiral's last stage."""

    def run(self, model: nn.Module, inputs: StageInputs) -> Quantized:
        """Quantize ``model`` (not modified) to an int8 ONNX Runtime model."""
        return _int8_ptq(self, model, inputs)

    def check(self, model: nn.Module, example: Tensor) -> None:
        """The ``keep_float`` patterns name modules of ``model``."""
        _check_keep_float(model, self.keep_float)


class WeightOnlyStage(BaseModel):
    """Weight-only quantization of the Linear and Conv2d layers as the spiral's last stage.

    No training: ``method: rtn`` rounds every weight to the nearest code; ``method: gptq``
    chooses the codes layer by layer on ``samples`` training examples so that each layer's
    outputs change least (`spiralkit.quant.gptq`). Both give the same format (codes and
    per-group scales, `spiralkit.quant.weight_only`), saved as ``model.weight-only.safetensors``;
    pruned weights stay exactly zero.

    With ``runtime: ort`` (the default) the model is also saved as ``model.weight-only.onnx``,
    each Linear one ONNX Runtime ``MatMulNBits`` node holding the packed codes
    (`spiralkit.quant.ort.export_weight_only_onnx`): that file is what the run measures and
    ``spiral export`` writes. ONNX Runtime has no block-quantized convolution, so quantized
    convolutions are stored dequantized in float there. ``runtime: pytorch`` measures the
    PyTorch modules (which dequantize on the fly) and is the only choice for 3 bits.

    Attributes:
        method: ``rtn`` or ``gptq``.
        bits: 3, 4 or 8.
        group_size: input weights sharing a scale (``None``: per output channel); when not
            given, 32 for 3 and 4 bits, per channel for 8 bits.
        act_order: GPTQ visits columns by decreasing input energy (scales stay static).
        samples: GPTQ's calibration examples.
        damp: GPTQ's Hessian dampening (a fraction of its mean diagonal).
        exclude: layer name patterns kept in float.
        runtime: ``ort`` (``MatMulNBits``) or ``pytorch``.
        accuracy_level: ``MatMulNBits``'s attribute: 0 (float32 arithmetic) or 4 (int8
            activations where the CPU has the kernel; faster at larger batches).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["weight-only"] = "weight-only"
    method: Literal["rtn", "gptq"] = "gptq"
    bits: Literal[3, 4, 8] = 4
    group_size: int | None = Field(default=None, gt=0)
    act_order: bool = False
    samples: int = Field(default=128, gt=0)
    damp: float = Field(default=0.01, gt=0)
    exclude: tuple[str, ...] = ()
    runtime: Literal["ort", "pytorch"] = "ort"
    accuracy_level: Literal[0, 4] = 0

    @model_validator(mode="before")
    @classmethod
    def _default_group_size(cls, data: Any) -> Any:
        return default_group_size(data, bits=4)

    def run(self, model: nn.Module, inputs: StageInputs) -> Quantized:
        """Quantize a copy of ``model``, save its codes and, for ONNX Runtime, its ``MatMulNBits`` file."""
        quantized = copy.deepcopy(model)
        if self.method == "gptq":
            config = GPTQConfig(bits=self.bits, group_size=self.group_size, act_order=self.act_order,
                                samples=self.samples, damp=self.damp)
            bits = quantize_gptq_(quantized, config, inputs.train_loader, exclude=self.exclude,  # type: ignore[arg-type]
                                  masks=inputs.masks)
        else:  # round to nearest: a pruned (zero) weight has code 0
            bits = quantize_weights_(quantized, WeightOnlyConfig(bits=self.bits, group_size=self.group_size),
                                     exclude=self.exclude)
        size = save_weight_only(quantized, inputs.directory / WEIGHT_ONLY)
        if self.runtime == "pytorch":
            return Quantized(model=quantized.eval(), artefact=inputs.directory / WEIGHT_ONLY, size_bytes=size,
                             method="ptq", bits=bits)
        path = export_weight_only_onnx(quantized, inputs.example, inputs.directory / WEIGHT_ONLY_ONNX,
                                       accuracy_level=self.accuracy_level)
        return Quantized(model=OrtModel(path, threads=inputs.threads), artefact=path, size_bytes=path.stat().st_size,
                         method="ptq", bits=bits)

    def check(self, model: nn.Module, example: Tensor) -> None:
        """The ``exclude`` patterns name Linear/Conv2d layers; for ONNX Runtime, bits and groups fit ``MatMulNBits``."""
        layers = [name for name, m in model.named_modules() if name and isinstance(m, (nn.Linear, nn.Conv2d))]
        if not layers:
            raise ConfigError("kind", f"{type(model).__name__} has no nn.Linear or nn.Conv2d layer to quantize")
        if (pattern := first_unmatched(self.exclude, layers)) is not None:
            raise ConfigError("exclude", f"pattern {pattern!r} matches no Linear/Conv2d layer; layers are: "
                              f"{', '.join(layers[:20])}" + (" …" if len(layers) > 20 else ""))
        if self.runtime != "ort":
            return
        if self.bits not in (4, 8):
            raise ConfigError("bits", f"ONNX Runtime's MatMulNBits runs 4- or 8-bit weights, got {self.bits}; "
                                      "use `runtime: pytorch` for 3 bits")
        block = self.group_size
        if block is None or block < 16 or block & (block - 1):
            raise ConfigError("group_size", f"ONNX Runtime's MatMulNBits needs groups of a power-of-two size >= 16 "
                                            f"(e.g. 32), got {block if block is not None else 'none (per channel)'}"
                                            " (or use `runtime: pytorch`)")


class QuantizeStageKind(Protocol):
    """What the spiral asks of a quantize stage; each stage kind implements it."""

    kind: str

    def run(self, model: nn.Module, inputs: StageInputs) -> Quantized:
        """Quantize ``model`` (not modified): the quantized model, its artefact and how it was made."""
        ...

    def check(self, model: nn.Module, example: Tensor) -> None:
        """Raise `ConfigError` (naming the key) when the stage cannot apply to ``model``; before any training."""
        ...


QUANTIZE_STAGES: dict[str, type[BaseModel]] = by_kind(CompactQuant, StaticInt8Stage, DynamicInt8Stage, WeightOnlyStage)
"""The quantize stage kinds a recipe can name: a new kind is a `QuantizeStageKind` class and a line here."""

QuantizeStage = Annotated[QuantizeStageKind, KindTable(QUANTIZE_STAGES, what="quantize stage")]
"""The recipe's quantize stage."""


def _run_compact(config: CompactQuant, model: nn.Module, inputs: StageInputs) -> Quantized:
    """Quantize the non-zero weights (PTQ, then QAT with distillation if PTQ loses too much); save ``model.spkc``."""
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
            config.qat.objective(task=inputs.task, teacher=inputs.teacher), param_bits, granularity=granularity
        )
        try:
            train(trained, inputs.train_loader, config=config.qat.train, objective=objective, seed=inputs.seed,
                  masks=inputs.masks, progress=True, description="quantization-aware recovery", world=inputs.world,
                  checkpoint=inputs.checkpoint)
        except NonFiniteLoss:
            trained = None  # QAT diverged: the post-training model stands
        if trained is not None:
            quantize_nonzero_(trained, bits, granularity=granularity)
            if metric_drop(inputs.task, baseline=ptq_metric, value=inputs.evaluate(trained)) < 0:  # QAT only if it helped
                quantized, method = trained, "qat"
    path = inputs.directory / COMPACT
    size = save_compressed(quantized, path, spec=inputs.spec, bits=bits, granularity=granularity)
    return Quantized(model=quantized.eval(), artefact=path, size_bytes=size, method=method, bits=bits)
