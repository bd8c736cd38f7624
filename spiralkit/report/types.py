"""The run report: baseline, one entry per round, final — as typed data."""

from __future__ import annotations

from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA = "spiralkit.report/4"
"""Version 4: the number of data-parallel processes (`Outcome.processes`). Version 3: every latency
names its runtime, batch size and threads (`Metrics.latency_runtime`...)."""
OLDER_SCHEMAS = ("spiralkit.report/2", "spiralkit.report/3")
"""Reports that still load: a version-3 one ran in 1 process; version 2's latencies get the report's
``measurement`` batch and threads and the runtime the spiral used (ONNX Runtime for an ``.onnx``
final artefact, else eager PyTorch)."""

LatencyRuntime = Literal["eager", "ort", "openvino", "openvino_bf16"]


class Metrics(BaseModel):
    """What one model measured.

    Attributes:
        metric: the task metric on held-out test data (validation when there is none).
        val_metric: the task metric on the validation split used for keep/rollback.
        params: all parameters.
        nonzero_params: parameters that are not zero.
        sparsity: ``1 − nonzero_params / params``.
        size_bytes: the saved artefact on disk (sparse encoding when that is smaller).
        dense_size_bytes: the dense safetensors file on disk.
        macs: multiply-accumulates of one forward pass at the latency batch size.
        latency_ms: median latency of one forward pass.
        latency_runtime: what ran it: ``eager`` (PyTorch), ``ort`` (ONNX Runtime), ``openvino``.
        latency_batch_size: the batch size it was timed at.
        latency_threads: the intra-op threads it was timed with.

    The three ``latency_*`` fields are None only in run states saved before schema 3; a
    `Report` fills them (see `OLDER_SCHEMAS`).
    """

    model_config = ConfigDict(extra="forbid")
    metric: float
    val_metric: float
    params: int
    nonzero_params: int
    sparsity: float
    size_bytes: int
    dense_size_bytes: int
    macs: int
    latency_ms: float
    latency_runtime: LatencyRuntime | None = None
    latency_batch_size: int | None = None
    latency_threads: int | None = None


_M = TypeVar("_M", bound=Metrics)


class RoundRecord(Metrics):
    """One spiral round: what it tried, what it measured, whether it was kept.

    Attributes:
        index: the round's number, from 1.
        stage: the pruning stage it belongs to, from 1 (hybrid recipes have several).
        progress: what the stage's target is on — ``sparsity`` (unstructured) or the
            reduction of ``macs``, ``params`` or ``latency`` against the baseline.
        target: the progress the round aimed at, e.g. 0.5 for half the baseline's MACs.
        accepted: kept (True) or rolled back.
        seconds: wall-clock time of the round.
        reason: ``kept``, or why it was rolled back.
        epochs: the round's recovery epochs (None in reports written before they were recorded).
        predicted_latency_ms: a latency-constrained round: the pruned model's latency its
            latency table predicted (None otherwise, and in older reports).
        measured_latency_ms: the same model's latency measured end to end, right after the cut.
        prediction_runtime: the runtime both are on (``ort``, ``eager``…), at the report's
            ``measurement`` batch size and threads (the round's own ``latency_ms`` names its
            runtime in ``latency_runtime``, as every measured latency does).
    """

    index: int
    stage: int = 1
    progress: str = "sparsity"
    target: float
    accepted: bool
    seconds: float
    reason: str
    epochs: int | None = None
    predicted_latency_ms: float | None = None
    measured_latency_ms: float | None = None
    prediction_runtime: str | None = None

    @property
    def prediction_error(self) -> float | None:
        """``predicted / measured − 1`` of a latency-constrained round (None for other rounds)."""
        if self.predicted_latency_ms is None or not self.measured_latency_ms:
            return None
        return self.predicted_latency_ms / self.measured_latency_ms - 1.0


class QuantInfo(BaseModel):
    """How the final model was quantized."""

    model_config = ConfigDict(extra="forbid")
    kind: str
    method: str  # "ptq", or "qat" when post-training quantization lost too much
    bits: dict[str, int]
    artefact: str


class TaskInfo(BaseModel):
    """The task's metric name and direction."""

    model_config = ConfigDict(extra="forbid")
    metric: str
    higher_is_better: bool


class Measurement(BaseModel):
    """How latency was measured."""

    model_config = ConfigDict(extra="forbid")
    batch_size: int
    threads: int
    warmup: int
    repeats: int
    clock: str = "wall"


class Outcome(BaseModel):
    """What a run has measured so far: the part of a run that its report shows.

    The runner's saved state extends it with its progress; the report adds its header.

    Attributes:
        baseline: the trained dense model.
        student: with a student stage, the distilled student before any pruning round.
        rounds: every round, kept or rolled back.
        pruned: with a quantize stage, the model before quantization.
        quantization: how the final model was quantized.
        final: the final model; ``None`` until the run ends.
        stopped: why the pruning rounds ended.
        processes: the data-parallel processes (torchrun's ``WORLD_SIZE``) of the launch that
            ran the run's last steps; 1 without torchrun, and in reports before schema 4.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    baseline: Metrics | None = None
    student: Metrics | None = None
    rounds: list[RoundRecord] = Field(default_factory=list)
    pruned: Metrics | None = None
    quantization: QuantInfo | None = None
    final: Metrics | None = None
    stopped: str | None = None
    processes: int = Field(default=1, ge=1)

    def outcome(self) -> dict[str, object]:
        """The `Outcome` fields alone, as keyword arguments."""
        return {name: getattr(self, name) for name in Outcome.model_fields}


class _ReportHeader(BaseModel):
    """What a report says about the run before its results."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    schema_: str = Field(default=SCHEMA, alias="schema")
    name: str
    task: TaskInfo
    measurement: Measurement


class Report(Outcome, _ReportHeader):
    """A spiral run's report: its header, then the `Outcome`; ``final`` is ``None`` until the run ends.

    With a student stage, ``student`` is the distilled student before any pruning round.
    With a quantize stage, ``pruned`` is the model before quantization and ``final`` after.
    """

    baseline: Metrics

    @model_validator(mode="after")
    def _name_latencies(self) -> Report:
        """Latencies recorded before schema 3 get the measurement's batch and threads and the spiral's runtime."""
        onnx_final = self.quantization is not None and self.quantization.artefact.endswith(".onnx")
        self.baseline = self._named(self.baseline, "eager")
        self.student = self._named(self.student, "eager")
        self.rounds = [self._named(record, "eager") for record in self.rounds]
        self.pruned = self._named(self.pruned, "eager")
        self.final = self._named(self.final, "ort" if onnx_final else "eager")
        if self.schema_ in OLDER_SCHEMAS:
            self.schema_ = SCHEMA  # what it holds now is a schema-3 report
        return self

    def _named(self, metrics: _M | None, runtime: LatencyRuntime) -> _M | None:
        """``metrics`` (a copy) with its latency named, when it is not yet."""
        if metrics is None or metrics.latency_runtime is not None:
            return metrics
        return metrics.model_copy(update={"latency_runtime": runtime, "latency_batch_size": self.measurement.batch_size,
                                          "latency_threads": self.measurement.threads})

    def to_json(self) -> str:
        """The report as JSON, with ``schema`` as its first key."""
        return self.model_dump_json(by_alias=True, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Report:
        """Parse a report written by :meth:`to_json`."""
        return cls.model_validate_json(text)
