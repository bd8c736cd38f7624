"""The run directory: every file a run writes, named once here, with the helpers that save and load them.

```
RUN_DIR/recipe.yaml            the validated recipe (resume reads it from here)
RUN_DIR/state.json             progress: baseline, rounds, current stage, progress and step scale
RUN_DIR/curves.json            training loss per epoch of the baseline's training and of each
                               round's recovery, and each round's validation metric (for the plots)
RUN_DIR/baseline.safetensors   the trained dense model (the frozen teacher)
RUN_DIR/student.json, student.safetensors  the student's layout and distilled weights, when
                               the recipe builds a student from the baseline
RUN_DIR/rounds/NNN/            weights, masks (one bit per weight, `spiralkit.prune.nm`) and structured
                               plans of each kept round
RUN_DIR/epoch.pt               the training in progress after its last finished epoch (model,
                               optimizer, schedule, RNG): a resumed run continues that training
                               from there; removed once its step (baseline, student, round) is saved
RUN_DIR/model.safetensors      the final pruned model (dense layout)
RUN_DIR/model.sparse.safetensors  the same, in the compact sparse encoding
RUN_DIR/plan.json              the structured plans, in order, when channels were removed:
                               the recipe's model with these replayed takes model.safetensors
RUN_DIR/model.spkc             the compact quantized artefact (quantize kind ``compact``)
RUN_DIR/model.weight-only.safetensors  the weight-only model (quantize kind ``weight-only``, RTN or
                               GPTQ; format in `spiralkit.quant.weight_only`)
RUN_DIR/sensitivity.json       the per-layer bit-width scan (``bits: {kind: mixed}``)
RUN_DIR/int8/                  the int8 ONNX models (quantize kinds ``static-int8``, ``dynamic-int8``)
RUN_DIR/model.onnx             what ``spiral export`` writes
RUN_DIR/report.json, report.md, report.html
```

Every file is written atomically and ``state.json`` last, so a kill at any moment leaves
the previous consistent state.
"""

from __future__ import annotations

import copy
import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import ConfigDict, Field, ValidationError
from torch import nn

from spiralkit.errors import SpiralError, StorageError
from spiralkit.export import atomic_write_text, load_state, save_weights
from spiralkit.prune import Masks
from spiralkit.prune.apply import replay_plans
from spiralkit.prune.nm import load_masks, save_masks
from spiralkit.prune.plan import PrunePlan, read_plans, write_plans
from spiralkit.report import Outcome
from spiralkit.report.curves import Curves, TrainingCurve
from spiralkit.report.html import REPORT_HTML
from spiralkit.report.render import REPORT_JSON, REPORT_MARKDOWN
from spiralkit.train import EpochCheckpoint

__all__ = [
    "BASELINE",
    "COMPACT",
    "CURVES",
    "EPOCH",
    "INT8_DIR",
    "LOCK",
    "MODEL",
    "MODEL_SPARSE",
    "ONNX",
    "PLANS",
    "QAT_ONNX",
    "RECIPE",
    "REPORT_HTML",
    "REPORT_JSON",
    "REPORT_MARKDOWN",
    "SENSITIVITY",
    "STATE",
    "STATE_SCHEMA",
    "STUDENT_LAYOUT",
    "STUDENT_WEIGHTS",
    "WEIGHT_ONLY",
    "WEIGHT_ONLY_ONNX",
    "Pruned",
    "clear_epoch_checkpoint",
    "epoch_checkpoint",
    "RunState",
    "load_curves",
    "load_round",
    "load_run_state",
    "record_training",
    "run_lock",
    "save_round",
    "save_run_state",
]

RECIPE = "recipe.yaml"
STATE = "state.json"
CURVES = "curves.json"
BASELINE = "baseline.safetensors"
STUDENT_LAYOUT = "student.json"
STUDENT_WEIGHTS = "student.safetensors"
ROUNDS = "rounds"
MODEL = "model.safetensors"
MODEL_SPARSE = "model.sparse.safetensors"
PLANS = "plan.json"
MASKS = "masks.safetensors"  # one byte per weight: read from runs written before MASKS_PACKED
MASKS_PACKED = "masks.packed.safetensors"
COMPACT = "model.spkc"
WEIGHT_ONLY = "model.weight-only.safetensors"
SENSITIVITY = "sensitivity.json"
INT8_DIR = "int8"
QAT_ONNX = "model.qat.onnx"
WEIGHT_ONLY_ONNX = "model.weight-only.onnx"
ONNX = "model.onnx"
EPOCH = "epoch.pt"

STATE_SCHEMA = "spiralkit.state/2"


class RunState(Outcome):
    """What a run has done so far; saved as ``state.json`` after every step.

    The measured results are the report's `Outcome`; the rest is the spiral's progress.

    Attributes:
        accepted: rounds kept, over all stages.
        stage: index of the pruning stage in progress.
        stage_accepted: rounds kept in that stage (the schedule's clock).
        progress: that stage's progress (sparsity, or reduction of MACs/params/latency).
        scale: the step's scale; halved for good by every rolled-back round.
        checkpoint: the directory of the last kept round, relative to the run directory.
        stage_stops: why each finished stage ended.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    schema_: str = Field(default=STATE_SCHEMA, alias="schema")
    accepted: int = 0
    stage: int = 0
    stage_accepted: int = 0
    progress: float = 0.0
    scale: float = 1.0
    checkpoint: str | None = None
    stage_stops: list[str] = Field(default_factory=list)


@dataclass(frozen=True)
class Pruned:
    """A model as the spiral has pruned it: weights, the masks in force, the structured plans applied."""

    model: nn.Module
    masks: Masks | None = None
    plans: tuple[PrunePlan, ...] = ()


def save_run_state(run_dir: Path, state: RunState) -> None:
    """Write ``state.json`` atomically: the commit point of every step."""
    atomic_write_text(run_dir / STATE, state.model_dump_json(by_alias=True, indent=2) + "\n")


def load_run_state(run_dir: Path) -> RunState:
    """The state of the run in ``run_dir`` (empty for a new run).

    Raises:
        SpiralError: ``state.json`` is not a spiralkit state of this version.
    """
    path = run_dir / STATE
    if not path.exists():
        return RunState()
    try:
        return RunState.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        raise SpiralError(f"{path} is not a run state spiralkit can resume ({exc.error_count()} error(s): "
                          f"{exc.errors()[0]['msg']})") from None


def load_curves(run_dir: Path) -> Curves | None:
    """The run's training curves; None for a run directory without ``curves.json`` (written before it existed).

    Raises:
        SpiralError: ``curves.json`` is not spiralkit's curves file.
    """
    path = Path(run_dir) / CURVES
    if not path.exists():
        return None
    try:
        return Curves.from_json(path.read_text(encoding="utf-8"))
    except (ValidationError, UnicodeDecodeError) as exc:
        detail = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else "not UTF-8 text"
        raise SpiralError(f"{path} is not a spiralkit curves file ({detail}); delete it to render without curves") from None


def record_training(run_dir: Path, curve: TrainingCurve) -> None:
    """Add ``curve`` to ``curves.json`` (atomically), replacing an entry of the same label.

    A round interrupted after this and before ``state.json`` is run again on resume, and its
    new curve replaces this one.
    """
    curves = load_curves(run_dir) or Curves()
    atomic_write_text(Path(run_dir) / CURVES, curves.with_training(curve).to_json())


def epoch_checkpoint(run_dir: Path, label: str) -> EpochCheckpoint:
    """Where the training called ``label`` (``baseline``, ``round 3 recover``...) keeps its epoch checkpoint."""
    return EpochCheckpoint(path=Path(run_dir) / EPOCH, label=label)


def clear_epoch_checkpoint(run_dir: Path) -> None:
    """Remove the epoch checkpoint: the step whose training it held is saved."""
    (Path(run_dir) / EPOCH).unlink(missing_ok=True)


def _round_dir(run_dir: Path, index: int) -> Path:
    return run_dir / ROUNDS / f"{index:03d}"


def save_round(run_dir: Path, index: int, pruned: Pruned) -> str:
    """Save kept round ``index``: weights, masks, plans; returns its directory relative to ``run_dir``."""
    directory = _round_dir(run_dir, index)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create {directory}: {exc.strerror or exc}") from None
    save_weights(pruned.model, directory / MODEL)
    if pruned.masks:
        save_masks(directory / MASKS_PACKED, pruned.masks)
    if pruned.plans:
        write_plans(directory / PLANS, pruned.plans)
    return str(directory.relative_to(run_dir))


def load_round(run_dir: Path, checkpoint: str, base: nn.Module) -> Pruned:
    """The kept round in ``checkpoint``: ``base``'s architecture with its plans replayed, and its weights."""
    directory = run_dir / checkpoint
    plans = read_plans(directory / PLANS) if (directory / PLANS).exists() else ()
    model = replay_plans(copy.deepcopy(base), plans)
    model.load_state_dict(load_state(directory / MODEL))
    masks_file = directory / MASKS
    masks = {name: m.bool() for name, m in load_state(masks_file).items()} if masks_file.exists() else None
    if (directory / MASKS_PACKED).exists():
        masks = load_masks(directory / MASKS_PACKED)
    return Pruned(model=model.eval(), masks=masks, plans=plans)


LOCK = ".lock"


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's exclusive lock while the block runs: one writer per run directory.

    The lock is an advisory ``flock`` on ``RUN_DIR/.lock``, which the kernel releases when its
    holder exits however it dies, so a lock left by a killed run is simply taken over. The
    file records the holder's process id, for the message a second writer gets.

    Raises:
        SpiralError: another process holds the lock (the message names it), or the directory
            cannot be created or written.
    """
    path = run_dir / LOCK
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole block
    except OSError as exc:
        raise SpiralError(f"cannot lock run directory {run_dir}: {exc.strerror or exc}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise SpiralError(
                f"{run_dir} is in use by {holder}: one run writes a run directory at a time; "
                "wait for it to end, or choose another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
