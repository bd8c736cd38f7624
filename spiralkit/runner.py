"""The spiral: baseline → [prune a step → recover → evaluate → keep or roll back]* → final.

Everything a run needs is passed explicitly; everything it has done is in its run
directory, so a killed run resumes where it stopped:

```
RUN_DIR/recipe.yaml            the validated recipe (resume reads it from here)
RUN_DIR/state.json             progress: baseline, rounds, current sparsity and step scale
RUN_DIR/baseline.safetensors   the trained dense model (the frozen teacher)
RUN_DIR/student.json, student.safetensors  the student's layout and distilled weights, when
                               the recipe builds a student from the baseline
RUN_DIR/rounds/NNN/            weights, masks and structured plans of each kept round
RUN_DIR/model.safetensors      the final pruned model (dense layout)
RUN_DIR/model.sparse.safetensors  the same, in the compact sparse encoding
RUN_DIR/plan.json              the structured plans, in order, when channels were removed:
                               the recipe's model with these replayed takes model.safetensors
RUN_DIR/report.json, report.md
```

Every file is written atomically and ``state.json`` last, so a kill at any moment leaves
the previous consistent state; an interrupted round is simply run again, with the same
seed, and gives the same result.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from torch import Tensor, nn

from spiralkit.data import DataSplits, load_data
from spiralkit.distill.cache import CachedModel, TeacherCache
from spiralkit.distill.recovery import Distill, distill, freeze, recovery_objective
from spiralkit.distill.students import STUDENT_FILENAME, StudentLayout, apply_student, plan_student, read_layout
from spiralkit.errors import RecipeError, SpiralError
from spiralkit.export import atomic_write_text, load_state, save_sparse, save_weights
from spiralkit.export.onnx import VerifyResult, export_onnx, verify_onnx
from spiralkit.measure import count_macs, count_params, measure_latency, size_on_disk
from spiralkit.models import load_model, load_weights
from spiralkit.models.loading import is_pretrained
from spiralkit.prune import Masks, next_sparsity
from spiralkit.prune.apply import replay_plans
from spiralkit.prune.plan import PrunePlan, read_plans, write_plans
from spiralkit.prune.stages import StageContext, StructuredStage, prune_round, stage_progress, stage_target
from spiralkit.prune.structured_importance import bn_l1_penalty
from spiralkit.quant.stage import Quantized, StageInputs, quantize_stage
from spiralkit.recipe import Recipe, dump_recipe, load_recipe
from spiralkit.report import Measurement, Metrics, QuantInfo, Report, RoundRecord, TaskInfo, print_report, write_report
from spiralkit.tasks import evaluate, metric_drop
from spiralkit.train import NonFiniteLoss, Objective, Wrapped, supervised, train

STATE_SCHEMA = "spiralkit.state/2"
PLANS = "plan.json"
STUDENT_WEIGHTS = "student.safetensors"
_REFERENCE_CACHE_MB = 256.0  # the fidelity reference's outputs on the evaluation splits, kept in memory


class RunState(BaseModel):
    """What a run has done so far; saved as ``state.json`` after every step.

    Attributes:
        stage: index of the pruning stage in progress.
        stage_accepted: rounds kept in that stage (the schedule's clock).
        progress: that stage's progress (sparsity, or reduction of MACs/params/latency).
        scale: the step's scale; halved for good by every rolled-back round.
        stage_stops: why each finished stage ended.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    schema_: str = Field(default=STATE_SCHEMA, alias="schema")
    baseline: Metrics | None = None
    rounds: list[RoundRecord] = Field(default_factory=list)
    accepted: int = 0
    stage: int = 0
    stage_accepted: int = 0
    progress: float = 0.0
    scale: float = 1.0
    student: Metrics | None = None
    checkpoint: str | None = None
    stage_stops: list[str] = Field(default_factory=list)
    stopped: str | None = None
    pruned: Metrics | None = None
    quantization: QuantInfo | None = None
    final: Metrics | None = None


@dataclass
class RunContext:
    """What every stage of a run works with, passed explicitly."""

    recipe: Recipe
    data: DataSplits
    teacher: nn.Module
    reference: nn.Module  # the teacher through a cache of its outputs, for tasks that compare with it
    example: Tensor
    run_dir: Path
    console: Console
    cache: TeacherCache | None = None


@dataclass(frozen=True)
class Pruned:
    """A model as the spiral has pruned it: weights, the masks in force, the structured plans applied."""

    model: nn.Module
    masks: Masks | None = None
    plans: tuple[PrunePlan, ...] = ()


def save_run_state(run_dir: Path, state: RunState) -> None:
    """Write ``state.json`` atomically: the commit point of every step."""
    atomic_write_text(run_dir / "state.json", state.model_dump_json(by_alias=True, indent=2) + "\n")


def load_run_state(run_dir: Path) -> RunState:
    """The state of the run in ``run_dir`` (empty for a new run)."""
    path = run_dir / "state.json"
    if not path.exists():
        return RunState()
    return RunState.model_validate_json(path.read_text(encoding="utf-8"))


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _teacher_cache(recipe: Recipe) -> Iterator[TeacherCache | None]:
    """One cache of the frozen teacher's outputs for all the rounds, which distil from the same
    teacher on the same (unaugmented) examples with the same losses; None when the recovery
    asks for none. (A student stage's distillation keeps a cache of its own.)"""
    if not isinstance(recipe.recover, Distill) or not recipe.recover.cache_teacher:
        yield None
        return
    with TeacherCache(budget_mb=recipe.recover.cache_budget_mb) as cache:
        yield cache


def _example_input(data: DataSplits, batch_size: int) -> Tensor:
    """A fixed input of ``batch_size`` real examples, for MACs and latency."""
    x, _ = next(iter(data.val))
    repeats = -(-batch_size // x.shape[0])
    return x.repeat(repeats, *([1] * (x.dim() - 1)))[:batch_size].clone()


def measure_model(model: nn.Module, ctx: RunContext) -> Metrics:
    """Evaluate and measure ``model``: metric, parameters, size on disk, MACs, latency."""
    recipe = ctx.recipe
    held_out = ctx.data.test if ctx.data.test is not None else ctx.data.val
    params = count_params(model)
    with tempfile.TemporaryDirectory() as scratch:
        size = size_on_disk(model, Path(scratch))
    latency = measure_latency(
        model, ctx.example, threads=recipe.measure.threads, warmup=recipe.measure.warmup, repeats=recipe.measure.repeats
    )
    return Metrics(
        metric=evaluate(recipe.task, model, held_out, reference=ctx.reference).metric,
        val_metric=evaluate(recipe.task, model, ctx.data.val, reference=ctx.reference).metric,
        params=params.total,
        nonzero_params=params.nonzero,
        sparsity=params.sparsity,
        size_bytes=size.best_bytes,
        dense_size_bytes=size.dense_bytes,
        macs=count_macs(model, ctx.example),
        latency_ms=latency.median_ms,
    )


def _baseline(model: nn.Module, recipe: Recipe, data: DataSplits, run_dir: Path, *, trained: bool, console: Console) -> None:
    """Train the dense model when needed and save it as ``baseline.safetensors``."""
    path = run_dir / "baseline.safetensors"
    if path.exists():
        model.load_state_dict(load_state(path))
        return
    if recipe.train is not None and recipe.model.checkpoint is None and not trained:
        console.print(f"[bold]baseline[/]: training {recipe.model.name} for {recipe.train.epochs} epoch(s)")
        try:
            train(model, data.train, config=recipe.train, objective=supervised(recipe.task.loss),
                  seed=recipe.seed, progress=True, description="baseline")
        except NonFiniteLoss as exc:
            raise SpiralError(f"baseline training diverged ({exc}); lower recipe key 'train.optimizer.lr'") from None
    elif recipe.model.checkpoint is None and not trained and not is_pretrained(recipe.model):
        raise RecipeError(
            f"model {recipe.model.name!r} has no 'model.checkpoint' and the recipe has no 'train' section: "
            "give trained weights or a training stage"
        )
    save_weights(model, path)


def _student_layout(ctx: RunContext) -> StudentLayout:
    """The student's layout: planned from the teacher once, then read from ``student.json``."""
    assert ctx.recipe.student is not None, "only recipes with a student stage have one"
    path = ctx.run_dir / STUDENT_FILENAME
    if path.exists():
        return read_layout(path)
    layout = plan_student(ctx.recipe.student.architecture, ctx.teacher, example=ctx.example,
                          batches=ctx.data.train, loss_fn=ctx.recipe.task.loss)
    atomic_write_text(path, layout.model_dump_json(indent=2))
    return layout


def _student(model: nn.Module, state: RunState, ctx: RunContext) -> nn.Module:
    """Build the recipe's student from the baseline and distil it (once; a resumed run loads it)."""
    assert ctx.recipe.student is not None, "only recipes with a student stage have one"
    stage = ctx.recipe.student
    student = apply_student(copy.deepcopy(model), _student_layout(ctx))
    weights = ctx.run_dir / STUDENT_WEIGHTS
    if state.student is not None:
        student.load_state_dict(load_state(weights))
        return student.eval()
    ctx.console.print(f"[bold]student[/]: {stage.architecture.kind}, distilling for {stage.distill.train.epochs} epoch(s)")
    try:
        distill(student, ctx.teacher, ctx.data.train, config=stage.distill, task=ctx.recipe.task,
                seed=ctx.recipe.seed + 500, progress=True)
    except NonFiniteLoss as exc:
        raise SpiralError(f"student distillation diverged ({exc}); lower recipe key 'student.distill.train.optimizer.lr'") from None
    save_weights(student, weights)
    state.student = measure_model(student, ctx)
    save_run_state(ctx.run_dir, state)
    ctx.console.print(f"student: {ctx.recipe.task.metric_name} {state.student.metric:.2f}, "
                      f"{state.student.latency_ms:.3f} ms at batch {ctx.recipe.measure.batch_size}")
    return student.eval()


def _round_dir(run_dir: Path, index: int) -> Path:
    return run_dir / "rounds" / f"{index:03d}"


def _save_round(run_dir: Path, index: int, pruned: Pruned) -> str:
    directory = _round_dir(run_dir, index)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(pruned.model, directory / "model.safetensors")
    if pruned.masks:
        save_weights({name: m.to(torch.uint8) for name, m in pruned.masks.items()}, directory / "masks.safetensors")
    if pruned.plans:
        write_plans(directory / PLANS, pruned.plans)
    return str(directory.relative_to(run_dir))


def _load_round(run_dir: Path, checkpoint: str, base: nn.Module) -> Pruned:
    """The kept round in ``checkpoint``: ``base``'s architecture with its plans replayed, and its weights."""
    directory = run_dir / checkpoint
    plans = read_plans(directory / PLANS) if (directory / PLANS).exists() else ()
    model = replay_plans(copy.deepcopy(base), plans)
    model.load_state_dict(load_state(directory / "model.safetensors"))
    masks_file = directory / "masks.safetensors"
    masks = {name: m.bool() for name, m in load_state(masks_file).items()} if masks_file.exists() else None
    return Pruned(model=model.eval(), masks=masks, plans=plans)


def _size_measure(stage: object, baseline: Metrics, ctx: RunContext) -> tuple[Callable[[nn.Module], float], float]:
    """The structured stage's measure of a model, and the baseline's value of it."""
    measure = ctx.recipe.measure
    if not isinstance(stage, StructuredStage) or stage.measure == "macs":
        return (lambda m: float(count_macs(m, ctx.example))), float(baseline.macs)
    if stage.measure == "params":
        return (lambda m: float(count_params(m).total)), float(baseline.params)
    return (
        lambda m: measure_latency(
            m, ctx.example, threads=measure.threads, warmup=measure.warmup, repeats=measure.repeats
        ).median_ms
    ), baseline.latency_ms


def _stage_context(stage: object, baseline: Metrics, ctx: RunContext) -> StageContext:
    size, baseline_size = _size_measure(stage, baseline, ctx)
    return StageContext(example=ctx.example, batches=ctx.data.train, loss_fn=ctx.recipe.task.loss,
                        size=size, baseline_size=baseline_size)


def _progress_name(stage: object) -> str:
    return f"{stage.measure} reduction" if isinstance(stage, StructuredStage) else "sparsity"


def _stage_step(state: RunState, ctx: RunContext) -> tuple[float | None, str | None]:
    """The current stage's progress target for the next round, or why the stage ends."""
    stage, targets = ctx.recipe.prune[state.stage], ctx.recipe.targets
    target = stage_target(stage)
    if state.progress >= target - 1e-6:
        return None, f"target {_progress_name(stage)} {target:.3f} reached"
    proposal = next_sparsity(stage.schedule, current=state.progress, target=target, rounds_done=state.stage_accepted)
    step = (proposal - state.progress) * state.scale
    final_full_step = state.scale == 1.0 and proposal >= target
    if step < targets.min_step and not final_full_step:
        return None, f"next step {step:.4f} below min_step {targets.min_step}"
    return min(state.progress + step, target), None


def _end_stage(state: RunState, why: str, pruned: Pruned, ctx: RunContext) -> None:
    """Record why the current stage ended and start the next one from where the model is."""
    stage = ctx.recipe.prune[state.stage]
    state.stage_stops.append(f"stage {state.stage + 1} ({stage.kind}): {why}" if len(ctx.recipe.prune) > 1 else why)
    state.stage, state.stage_accepted, state.scale = state.stage + 1, 0, 1.0
    if state.stage < len(ctx.recipe.prune) and state.baseline is not None:
        following = ctx.recipe.prune[state.stage]
        state.progress = stage_progress(following, pruned.model, pruned.masks,
                                        _stage_context(following, state.baseline, ctx))


def _next_target(state: RunState, pruned: Pruned, ctx: RunContext) -> float | None:
    """The target of the next round, moving on through finished stages; None when the spiral stops."""
    while state.stage < len(ctx.recipe.prune):
        target, why = _stage_step(state, ctx)
        if target is None:
            _end_stage(state, why or "", pruned, ctx)
        elif len(state.rounds) >= ctx.recipe.targets.max_rounds:
            state.stopped = "; ".join([*state.stage_stops, f"max_rounds {ctx.recipe.targets.max_rounds} reached"])
            return None
        else:
            return target
    state.stopped = "; ".join(state.stage_stops) or "no pruning stage"
    return None


def _recovery(stage: object, ctx: RunContext) -> Objective:
    """The recovery objective of a round, with network slimming's penalty when the stage asks for it."""
    objective = recovery_objective(ctx.recipe.recover, task=ctx.recipe.task, teacher=ctx.teacher, cache=ctx.cache)
    if not isinstance(stage, StructuredStage) or stage.bn_penalty == 0:
        return objective
    strength = stage.bn_penalty
    return Wrapped(objective, lambda base, model, x, y: base(model, x, y) + bn_l1_penalty(model, strength))


def _run_round(
    pruned: Pruned, target: float, state: RunState, ctx: RunContext, *, index: int
) -> tuple[Pruned, RoundRecord]:
    """Prune a copy of the model to ``target``, recover it, evaluate it; nothing is kept yet."""
    recipe = ctx.recipe
    assert state.baseline is not None, "the baseline is measured before any round"
    stage = recipe.prune[state.stage]
    started = time.perf_counter()
    seed = recipe.seed + 1000 * index
    torch.manual_seed(seed)
    candidate = copy.deepcopy(pruned.model)
    cut = prune_round(stage, candidate, pruned.masks, target=target,
                      ctx=_stage_context(stage, state.baseline, ctx))
    reason = ""
    try:
        train(candidate, ctx.data.train, config=recipe.recover.train, objective=_recovery(stage, ctx), seed=seed,
              masks=cut.masks, progress=True, description=f"round {index} recover")
    except NonFiniteLoss as exc:
        ctx.console.print(f"round {index}: {exc}")
        reason = "non-finite loss"
    metrics = measure_model(candidate, ctx)
    if not reason:
        drop = metric_drop(recipe.task, baseline=state.baseline.val_metric, value=metrics.val_metric)
        if drop > recipe.targets.max_metric_drop:
            reason = f"val drop {drop:.2f} > {recipe.targets.max_metric_drop}"
    record = RoundRecord(
        **metrics.model_dump(), index=index, stage=state.stage + 1, progress=_progress_name(stage), target=target,
        accepted=not reason, seconds=time.perf_counter() - started, reason=reason or "kept",
    )
    plans = pruned.plans + ((cut.plan,) if cut.plan is not None else ())
    return Pruned(model=candidate, masks=cut.masks, plans=plans), record


def _spiral(model: nn.Module, state: RunState, ctx: RunContext) -> tuple[Pruned, RunState]:
    assert state.baseline is not None, "the baseline is measured before any round"
    pruned = _load_round(ctx.run_dir, state.checkpoint, model) if state.checkpoint else Pruned(model=model)
    if not state.rounds and state.stage < len(ctx.recipe.prune):  # e.g. a student is already smaller
        first = ctx.recipe.prune[state.stage]
        state.progress = stage_progress(first, pruned.model, pruned.masks, _stage_context(first, state.baseline, ctx))
    while True:
        target = _next_target(state, pruned, ctx)
        if target is None:
            save_run_state(ctx.run_dir, state)
            return pruned, state
        index = len(state.rounds) + 1
        stage = ctx.recipe.prune[state.stage]
        candidate, record = _run_round(pruned, target, state, ctx, index=index)
        state.rounds.append(record)
        if record.accepted:
            before, pruned = state.progress, candidate
            state.accepted += 1
            state.stage_accepted += 1
            state.progress = stage_progress(stage, pruned.model, pruned.masks, _stage_context(stage, state.baseline, ctx))
            state.checkpoint = _save_round(ctx.run_dir, index, pruned)
            if state.progress <= before + 1e-6:
                _end_stage(state, f"round {index} could not prune further", pruned, ctx)
        else:
            state.scale /= 2
        save_run_state(ctx.run_dir, state)
        verdict = "[green]kept[/]" if record.accepted else f"[red]rolled back[/]: {record.reason}"
        ctx.console.print(
            f"round {index}: {record.progress} {100 * target:.1f}% → val {record.val_metric:.2f}, "
            f"{ctx.recipe.task.metric_name} {record.metric:.2f}, {record.macs:,} MACs — {verdict} "
            f"({record.seconds:.1f} s)"
        )


def _finish(result: Pruned, state: RunState, ctx: RunContext) -> None:
    """Save the pruned model (dense and sparse layouts, plans), quantize it if asked, measure both."""
    model, masks = result.model, result.masks
    pruned = measure_model(model, ctx)
    dense_bytes = save_weights(model, ctx.run_dir / "model.safetensors")
    sparse_bytes = save_sparse(model, ctx.run_dir / "model.sparse.safetensors")
    if result.plans:
        write_plans(ctx.run_dir / PLANS, result.plans)
    pruned = pruned.model_copy(update={"size_bytes": min(sparse_bytes, dense_bytes), "dense_size_bytes": dense_bytes})
    recipe = ctx.recipe
    if recipe.quantize is None:
        state.final = pruned
        return
    baseline_val = state.baseline.val_metric if state.baseline else pruned.val_metric
    inputs = StageInputs(
        spec=recipe.model, teacher=ctx.teacher, task=recipe.task, train_loader=ctx.data.train, masks=masks,
        evaluate=lambda m: evaluate(recipe.task, m, ctx.data.val, reference=ctx.reference).metric,
        baseline_val=baseline_val, pruned_val=pruned.val_metric, max_metric_drop=recipe.targets.max_metric_drop,
        seed=recipe.seed + 999_999, directory=ctx.run_dir, example=ctx.example, threads=recipe.measure.threads,
    )
    quantized = quantize_stage(recipe.quantize, model, inputs)
    state.pruned = pruned
    state.final = _quantized_metrics(quantized, pruned, ctx)
    state.quantization = QuantInfo(
        kind=recipe.quantize.kind, method=quantized.method, bits=quantized.bits,
        artefact=str(quantized.artefact.relative_to(ctx.run_dir)),
    )
    ctx.console.print(f"quantized ({quantized.method}): {recipe.task.metric_name} {state.final.metric:.2f}, "
                      f"{quantized.size_bytes:,} bytes")


def _quantized_metrics(quantized: Quantized, pruned: Metrics, ctx: RunContext) -> Metrics:
    """Metrics of the quantized model, whose size is its artefact's.

    An ONNX Runtime model has no torch parameters (its weights live in the file): its
    parameter counts and MACs are the pruned model's, since the integer kernels do the
    same multiply-accumulates.
    """
    final = measure_model(quantized.model, ctx)
    update: dict[str, float | int] = {"size_bytes": quantized.size_bytes, "dense_size_bytes": pruned.dense_size_bytes}
    if final.params == 0:
        update |= {key: getattr(pruned, key) for key in ("params", "nonzero_params", "sparsity", "macs")}
    return final.model_copy(update=update)


def build_report(recipe: Recipe, state: RunState) -> Report:
    """The report of a run's state."""
    if state.baseline is None:
        raise SpiralError("the run has no baseline yet: nothing to report")
    return Report(
        name=recipe.name,
        task=TaskInfo(metric=recipe.task.metric_name, higher_is_better=recipe.task.higher_is_better),
        measurement=Measurement(**recipe.measure.model_dump()),
        baseline=state.baseline,
        student=state.student,
        rounds=state.rounds,
        pruned=state.pruned,
        quantization=state.quantization,
        final=state.final,
        stopped=state.stopped,
    )


def _prepare_run_dir(recipe: Recipe, run_dir: Path, *, resume: bool) -> None:
    if resume:
        if not (run_dir / "recipe.yaml").exists():
            raise SpiralError(f"cannot resume {run_dir}: it holds no recipe.yaml (not a run directory)")
        return
    if (run_dir / "state.json").exists():
        raise SpiralError(f"{run_dir} already holds a run; resume it with --resume or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "recipe.yaml", dump_recipe(recipe))


class Spiral:
    """Runs a recipe: ``Spiral(recipe).run(run_dir)``.

    Args:
        recipe: the validated recipe.
    """

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe

    def run(
        self,
        run_dir: Path,
        *,
        resume: bool = False,
        model: nn.Module | None = None,
        data: DataSplits | None = None,
        console: Console | None = None,
    ) -> Report:
        """Run (or resume) the spiral in ``run_dir`` and return its report.

        Args:
            run_dir: where checkpoints, state and the report go.
            resume: continue the run already in ``run_dir``.
            model: a trained model to compress instead of ``recipe.model`` (used as is).
            data: data splits to use instead of ``recipe.data``.
            console: where progress is printed.
        """
        recipe, run_dir = self.recipe, Path(run_dir)
        console = console or Console()
        _prepare_run_dir(recipe, run_dir, resume=resume)
        with _threads(recipe.threads):
            data = data or load_data(recipe.data, seed=recipe.seed)
            trained = model is not None
            torch.manual_seed(recipe.seed)  # the model's random init is part of the run
            model = model if model is not None else load_model(recipe.model)
            _baseline(model, recipe, data, run_dir, trained=trained, console=console)
            teacher = freeze(copy.deepcopy(model))
            with _teacher_cache(recipe) as cache, TeacherCache(budget_mb=_REFERENCE_CACHE_MB, disk_budget_mb=0) as outputs:
                ctx = RunContext(recipe=recipe, data=data, teacher=teacher, reference=CachedModel(teacher, outputs),
                                 example=_example_input(data, recipe.measure.batch_size), run_dir=run_dir,
                                 console=console, cache=cache)
                state = load_run_state(run_dir)
                if state.baseline is None:
                    state.baseline = measure_model(model, ctx)
                    save_run_state(run_dir, state)
                if state.final is None:
                    if recipe.student is not None:
                        model = _student(model, state, ctx)
                    result, state = _spiral(model, state, ctx)
                    _finish(result, state, ctx)
                    save_run_state(run_dir, state)
        report = build_report(recipe, state)
        write_report(report, run_dir)
        print_report(report, console)
        return report


def export_run(run_dir: Path) -> tuple[Path, VerifyResult]:
    """Export a finished run's pruned model to ``RUN_DIR/model.onnx``, verified against PyTorch.

    The architecture comes from the run's recipe, the weights from ``model.safetensors``;
    ONNX Runtime's outputs on a validation batch are compared with the model's.

    Raises:
        SpiralError: the directory holds no finished run.
    """
    run_dir = Path(run_dir)
    weights = run_dir / "model.safetensors"
    if not weights.exists():
        raise SpiralError(f"{run_dir} holds no finished run: {weights} is missing")
    recipe = load_recipe(run_dir / "recipe.yaml")
    model = load_model(recipe.model.model_copy(update={"checkpoint": None}))
    if (run_dir / STUDENT_FILENAME).exists():
        apply_student(model, read_layout(run_dir / STUDENT_FILENAME))
    if (run_dir / PLANS).exists():
        replay_plans(model, read_plans(run_dir / PLANS))
    load_weights(model, weights)
    example = _example_input(load_data(recipe.data, seed=recipe.seed), 8)
    path = export_onnx(model, example, run_dir / "model.onnx")
    return path, verify_onnx(model, path, example)
