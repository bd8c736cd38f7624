"""Training, fine-tuning and recovery loops.

One loop serves baseline training, fine-tuning and distillation: what is minimised is an
*objective* ``objective(model, x, y) -> loss``, so distillation is just an objective that
also runs the frozen teacher. An objective may carry more (duck-typed, all optional):
``prepare(model, x)`` to build its own modules from the first batch, ``parameters()``
that are trained along with the model's (distillation adapters), and
``set_progress(fraction)`` to follow training progress (a temperature schedule). Pruning
masks, when given, are enforced on the optimizer this loop builds, so pruned weights stay
exactly zero.
"""

from __future__ import annotations

import io
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from spiralkit.cpu import native_bf16
from spiralkit.errors import SpiralError
from spiralkit.export import atomic_write_bytes
from spiralkit.parallel import SINGLE, World
from spiralkit.patterns import first_unmatched, matches_any
from spiralkit.prune.unstructured import enforce_masks

Objective = Callable[[nn.Module, Tensor, Tensor], Tensor]


class NonFiniteLoss(SpiralError):
    """The training loss became NaN or infinite."""


class OptimizerConfig(BaseModel):
    """Optimizer and its hyper-parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    nesterov: bool = False


Precision = Literal["fp32", "bf16", "auto"]
"""`TrainConfig.precision`: ``auto`` is ``bf16`` where the CPU has bf16 instructions, else ``fp32``."""


class TrainConfig(BaseModel):
    """How long and how to train.

    Attributes:
        epochs: passes over the training data (0 skips training).
        optimizer: optimizer and learning rate.
        lr_schedule: ``constant``, or ``cosine`` annealing to zero over all steps.
        max_batches: stop each epoch after this many batches (quick runs and tests).
        freeze: name patterns (fnmatch) of parameters left as they are, e.g.
            ``encoder.embeddings.word_embeddings.*``: they get no gradient and no optimizer
            step, which also saves their cost (a 30k-word embedding table is two thirds of
            a 3-layer MiniLM's parameters). A pattern matching no parameter is an error.
        precision: ``fp32``, or ``bf16`` mixed precision: each step's forward passes (the
            model's and a distillation teacher's) run under ``torch.autocast`` in bfloat16,
            so convolutions and matrix products use the CPU's bf16 instructions, while
            weights, gradients, optimizer state and the loss stay float32 (a distillation
            step of a CIFAR ResNet-56 ran 1.94x faster on an AVX-512-BF16 core: see
            ``bench/train_precision.py``). On a CPU without bf16 instructions PyTorch
            emulates them and a step is many times *slower* (18x for a ResNet-20 on a Zen 3
            core); training then warns (`spiralkit.cpu.native_bf16`). ``auto`` is ``bf16`` on a
            CPU with bf16 instructions and ``fp32`` otherwise (and on other devices), so one
            recipe trains fast on either kind of CPU; the two give slightly different models.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    epochs: int = Field(default=1, ge=0)
    optimizer: OptimizerConfig = OptimizerConfig()
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    max_batches: int | None = Field(default=None, gt=0)
    freeze: tuple[str, ...] = ()
    precision: Precision = "fp32"


def resolve_precision(precision: Precision, device: str) -> Literal["fp32", "bf16"]:
    """The precision a `TrainConfig.precision` trains in on ``device`` (``auto``: bf16 where the CPU has it)."""
    if precision == "auto":
        return "bf16" if device == "cpu" and native_bf16() else "fp32"
    return precision


def _mixed_precision(model: nn.Module, setting: Precision) -> torch.autocast:
    """The mixed-precision context of ``setting`` on ``model``'s device (inactive for ``fp32``).

    Warns when bf16 is asked on a CPU that has no bf16 instructions (emulated: slower, not faster).
    """
    device = next(model.parameters(), torch.empty(0)).device.type
    precision = resolve_precision(setting, device)
    if precision == "bf16" and device == "cpu" and not native_bf16():
        warnings.warn("precision bf16 on a CPU without bfloat16 instructions (no avx512_bf16, amx_bf16 or bf16 flag): "
                      "PyTorch emulates them, so training runs many times slower than in fp32 (18x for a CIFAR "
                      "ResNet-20 step on a Zen 3 core); set train.precision: fp32 or auto on this machine",
                      RuntimeWarning, stacklevel=4)  # _mixed_precision < _train < train < its caller
    return torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")


@dataclass(frozen=True)
class TrainStats:
    """What a training call did.

    Attributes:
        epochs: the epochs it ran.
        steps: the optimizer steps it took.
        last_loss: the loss of the last step (NaN without one).
        epoch_losses: the mean loss of each epoch's steps, in order (NaN for an epoch without steps).
    """

    epochs: int
    steps: int
    last_loss: float
    epoch_losses: tuple[float, ...] = ()


class _Sized(Protocol):
    def __iter__(self) -> Iterable[tuple[Tensor, Tensor]]: ...
    def __len__(self) -> int: ...


def build_optimizer(params: Iterable[nn.Parameter], config: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer ``config`` names, over ``params``."""
    params = [p for p in params if p.requires_grad]
    if config.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=config.nesterov and config.momentum > 0,
        )
    adam = torch.optim.Adam if config.name == "adam" else torch.optim.AdamW
    return adam(params, lr=config.lr, weight_decay=config.weight_decay)


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    if config.lr_schedule == "cosine" and steps > 0:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def supervised(loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Objective:
    """The objective ``loss_fn(model(x), y)``: plain training or fine-tuning."""

    def objective(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(model(x), y)

    return objective


class Wrapped:
    """An objective computed around another: ``around(base, model, x, y)``.

    What the base offers the training loop (``prepare``, ``parameters``, ``set_progress``,
    ``close``) is passed through, so wrapping (a penalty, fake-quantized weights) keeps
    distillation adapters trained and temperature schedules running.
    """

    _PASSED = frozenset({"prepare", "parameters", "set_progress", "close"})

    def __init__(self, base: Objective, around: Callable[[Objective, nn.Module, Tensor, Tensor], Tensor]) -> None:
        self.base = base
        self.around = around

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self.around(self.base, model, x, y)

    def __getattr__(self, name: str) -> Any:
        if name in Wrapped._PASSED:
            return getattr(self.base, name)
        raise AttributeError(name)


def objective_parameters(objective: Objective, model: nn.Module, loader: _Sized, *, seed: int) -> list[nn.Parameter]:
    """The objective's own trainable parameters, after its ``prepare`` saw the first batch.

    Objects without ``prepare``/``parameters`` (plain functions) have none.
    """
    prepare = getattr(objective, "prepare", None)
    if prepare is not None:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(seed)  # the first epoch's first batch, as the loop will see it
        x, _ = next(iter(loader))
        prepare(model, x)
    parameters = getattr(objective, "parameters", None)
    return list(parameters()) if parameters is not None else []


@contextmanager
def frozen(model: nn.Module, patterns: Sequence[str]) -> Iterator[None]:
    """Parameters whose names match ``patterns`` have ``requires_grad`` off inside; restored after.

    Raises:
        SpiralError: A pattern matches no parameter of ``model``; the message lists a few names.
    """
    named = dict(model.named_parameters())
    if (pattern := first_unmatched(patterns, named)) is not None:
        sample = ", ".join(list(named)[:6])
        raise SpiralError(f"train.freeze pattern {pattern!r} matches no parameter (parameters: {sample}, ...)")
    chosen = [name for name in named if matches_any(name, patterns)]
    before = {name: named[name].requires_grad for name in chosen}
    for name in chosen:
        named[name].requires_grad_(False)
    try:
        yield
    finally:
        for name, flag in before.items():
            named[name].requires_grad_(flag)


def _batches_per_epoch(loader: _Sized, config: TrainConfig) -> int:
    return min(len(loader), config.max_batches) if config.max_batches else len(loader)


@dataclass(frozen=True)
class EpochCheckpoint:
    """Where a training saves its state after every epoch, and which training it is.

    The file holds the model's and the objective's parameters, the optimizer's and the
    schedule's state, every rank's RNG state and the epochs done (``torch.save`` of tensors
    and plain data, read back with ``weights_only=True``). A training started with a
    checkpoint whose label, seed and length match its own continues from it; any other file
    there is ignored (and replaced at the next epoch). The loader's position is the epoch:
    epoch ``e`` is drawn with ``set_epoch(seed + e)``, and a teacher cache refills by itself.

    Attributes:
        path: the checkpoint file (written atomically, by rank 0 alone).
        label: which training this is, e.g. ``round 3 recover``.
    """

    path: Path
    label: str


def train(
    model: nn.Module,
    loader: _Sized,
    *,
    config: TrainConfig,
    objective: Objective,
    seed: int,
    masks: Mapping[str, Tensor] | None = None,
    progress: bool = False,
    description: str = "train",
    world: World = SINGLE,
    checkpoint: EpochCheckpoint | None = None,
) -> TrainStats:
    """Train ``model`` in place by minimising ``objective`` over ``loader``.

    Args:
        model: the model to train.
        loader: ``(x, y)`` batches; a loader with ``set_epoch`` is reshuffled per epoch.
            With several processes it is the whole data: each rank takes its share of
            every batch (`World.shard`).
        config: epochs, optimizer and schedule.
        objective: ``objective(model, x, y) -> scalar loss``; its own ``parameters()`` (after
            ``prepare(model, x)`` on the first batch) are optimized too, and its
            ``set_progress(fraction)`` is called before every step (see the module docstring).
        seed: seeds torch's RNG so that a run (or a resumed run) repeats exactly.
        masks: pruning keep-masks to enforce while training.
        progress: show a progress bar on a terminal; elsewhere (a log file) print one line
            per epoch with its mean loss and the time since training started.
        description: the progress bar's (or line's) label.
        world: the data-parallel processes training together (default: this one alone).
            Every rank must call `train` with the same arguments; the model ends the same on all.
        checkpoint: save the training's state after every epoch there, and continue from it.

    Raises:
        NonFiniteLoss: the loss became NaN or infinite; the model is left as it was at
            that step, so callers roll back to their checkpoint.
        SpiralError: the ranks hold models of different shapes.
    """
    with frozen(model, config.freeze):
        return _train(model, world.shard(loader), config=config, objective=objective, seed=seed, masks=masks,
                      progress=progress and world.main, description=description, world=world, checkpoint=checkpoint)


def _signature(checkpoint: EpochCheckpoint, *, seed: int, total: int) -> dict[str, object]:
    return {"label": checkpoint.label, "seed": seed, "total_steps": total}


def _resume_point(checkpoint: EpochCheckpoint | None, *, seed: int, total: int, console: Console) -> dict[str, Any] | None:
    """The saved state of this very training, or None (no file, or another training's)."""
    if checkpoint is None or not checkpoint.path.exists():
        return None
    try:
        saved = torch.load(checkpoint.path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - not ours or damaged: it only costs redoing the training
        console.print(f"{checkpoint.label}: ignoring {checkpoint.path.name}, not a readable epoch checkpoint "
                      f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); training from the first epoch",
                      highlight=False, soft_wrap=True)
        return None
    if not isinstance(saved, dict) or any(saved.get(k) != v for k, v in _signature(checkpoint, seed=seed, total=total).items()):
        return None
    return saved


def _save_epoch(checkpoint: EpochCheckpoint, state: dict[str, Any], *, world: World) -> None:
    """Write the epoch's state (rank 0), with every rank's RNG state; a collective."""
    rng = world.gather(torch.get_rng_state())
    if not world.main:
        return
    buffer = io.BytesIO()
    torch.save({**state, "rng": rng}, buffer)
    atomic_write_bytes(checkpoint.path, buffer.getvalue())


def _restore(saved: Mapping[str, Any], model: nn.Module, extra: Sequence[nn.Parameter],
             optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, *, world: World) -> None:
    model.load_state_dict(saved["model"])
    with torch.no_grad():
        for param, value in zip(extra, saved["extra"], strict=True):
            param.copy_(value)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rng = saved["rng"]
    torch.set_rng_state(rng[world.rank] if world.rank < len(rng) else rng[0])


def _train(
    model: nn.Module,
    loader: _Sized,
    *,
    config: TrainConfig,
    objective: Objective,
    seed: int,
    masks: Mapping[str, Tensor] | None,
    progress: bool,
    description: str,
    world: World,
    checkpoint: EpochCheckpoint | None,
) -> TrainStats:
    torch.manual_seed(seed)
    per_epoch = _batches_per_epoch(loader, config)
    extra = objective_parameters(objective, model, loader, seed=seed) if config.epochs else []
    optimizer = build_optimizer([*model.parameters(), *extra], config.optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    total = per_epoch * config.epochs
    scheduler = _scheduler(optimizer, config, total)
    set_progress = getattr(objective, "set_progress", None)
    steps, loss_value, start = 0, math.nan, time.perf_counter()
    epoch_losses: list[float] = []
    console = Console(quiet=not world.main)
    saved = _resume_point(checkpoint, seed=seed, total=total, console=console) if config.epochs else None
    first = 0
    if saved is not None:
        _restore(saved, model, extra, optimizer, scheduler, world=world)
        first, steps, loss_value, epoch_losses = saved["epochs"], saved["steps"], saved["loss"], list(saved["epoch_losses"])
        console.print(f"{description}: resuming after epoch {first}/{config.epochs} (epoch checkpoint)")
    state = [t for t in (*model.state_dict(keep_vars=True).values(), *extra) if isinstance(t, Tensor)]
    world.check_same("the model's parameter shapes and the epoch training starts from",
                     ([tuple(t.shape) for t in state], first))
    world.sync(state)  # every rank starts from rank 0's weights
    enforcer = enforce_masks(model, masks, optimizer) if masks else nullcontext()
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), transient=True,
        # Only on a terminal: in a log file a transient bar leaves a blank line per call.
        disable=not progress or not console.is_terminal, console=console,
    )
    log_epochs = progress and not console.is_terminal
    mixed = _mixed_precision(model, config.precision)
    model.train()
    with enforcer, bar:
        job = bar.add_task(description, total=per_epoch * config.epochs, completed=steps, loss=math.nan)
        for epoch in range(first, config.epochs):
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(seed + epoch)  # each round sees its own, reproducible order
            epoch_loss, epoch_start = 0.0, steps
            for batch_index, (x, y) in enumerate(loader):
                if batch_index >= per_epoch:
                    break
                if set_progress is not None:
                    set_progress(steps / max(1, total - 1))
                with mixed:
                    loss = objective(model, x, y).float()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                loss_value = world.average_gradients(params, loss)  # the global batch's loss, on every rank
                if not math.isfinite(loss_value):  # every rank sees it: all stop together, before the step
                    raise NonFiniteLoss(f"{description}: loss became {loss_value} at epoch {epoch}, batch {batch_index}")
                optimizer.step()
                scheduler.step()
                steps += 1
                epoch_loss += loss_value
                bar.update(job, advance=1, loss=loss_value)
            epoch_losses.append(epoch_loss / (steps - epoch_start) if steps > epoch_start else math.nan)
            if checkpoint is not None:
                _save_epoch(checkpoint, {
                    **_signature(checkpoint, seed=seed, total=total), "epochs": epoch + 1, "steps": steps,
                    "loss": loss_value, "epoch_losses": epoch_losses, "model": model.state_dict(),
                    "extra": [p.detach() for p in extra], "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                }, world=world)
            if log_epochs:
                console.print(f"{description}: epoch {epoch + 1}/{config.epochs}, "
                              f"mean loss {epoch_losses[-1]:.4f}, {time.perf_counter() - start:.0f} s")
    world.sync([t for t in model.state_dict(keep_vars=True).values() if isinstance(t, Tensor)])  # buffers too
    model.eval()
    return TrainStats(epochs=config.epochs, steps=steps, last_loss=loss_value, epoch_losses=tuple(epoch_losses))
