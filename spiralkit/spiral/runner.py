"""The spiral: baseline → [prune a step → recover → evaluate → keep or roll back]* → final.

Everything a run needs is passed explicitly; everything it has done is in its run
directory (`spiralkit.spiral.rundir` lists the files), so a killed run resumes where it
stopped: every file is written atomically and ``state.json`` last, and an interrupted
round is simply run again, with the same seed, and gives the same result.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from spiralkit.data import DataSplits, load_data
from spiralkit.distill.cache import CachedModel, TeacherCache
from spiralkit.errors import RecipeError, SpiralError
from spiralkit.export import atomic_write_text, load_state, save_sparse, save_weights
from spiralkit.models import load_model
from spiralkit.models.loading import is_pretrained
from spiralkit.modules import freeze, torch_threads
from spiralkit.parallel import SINGLE, World
from spiralkit.prune import next_sparsity
from spiralkit.prune.plan import write_plans
from spiralkit.report import Measurement, Metrics, QuantInfo, Report, RoundRecord, TaskInfo, print_report, write_report
from spiralkit.report.curves import TrainingCurve
from spiralkit.report.html import write_html_report
from spiralkit.spiral.fingerprint import FINGERPRINT, check_fingerprint, fingerprint, run_fingerprint, write_fingerprint
from spiralkit.spiral.context import RunContext, diverged, example_input, measure_here, measure_model, stage_context
from spiralkit.spiral.quantize import Quantized, StageInputs
from spiralkit.spiral.recipe import Recipe, dump_recipe
from spiralkit.spiral.recovery import Recovery, fitted_to
from spiralkit.spiral.rundir import (
    BASELINE,
    MODEL,
    MODEL_SPARSE,
    PLANS,
    RECIPE,
    STATE,
    Pruned,
    RunState,
    clear_epoch_checkpoint,
    epoch_checkpoint,
    load_curves,
    load_round,
    load_run_state,
    record_training,
    run_lock,
    save_round,
    save_run_state,
)
from spiralkit.spiral.student import run_student
from spiralkit.tasks import evaluate, metric_drop, within_tolerance
from spiralkit.train import NonFiniteLoss, TrainStats, supervised, train

_REFERENCE_CACHE_MB = 256.0  # the fidelity reference's outputs on the evaluation splits, kept in memory


@contextmanager
def _teacher_cache(recover: Recovery) -> Iterator[TeacherCache | None]:
    """One cache of the frozen teacher's outputs for all the rounds, which distil from the same
    teacher on the same (unaugmented) examples with the same losses; None when the recovery
    asks for none. (A student stage's distillation keeps a cache of its own.)"""
    cache = recover.shared_cache()
    if cache is None:
        yield None
        return
    with cache:
        yield cache


def train_baseline(
    model: nn.Module, recipe: Recipe, data: DataSplits, run_dir: Path, *, trained: bool, console: Console,
    on_trained: Callable[[TrainStats], None] | None = None, world: World = SINGLE,
) -> None:
    """Train the dense model when the recipe says so and save it as ``baseline.safetensors``.

    With a ``train`` section the model is trained from what it loads: random weights, or its
    checkpoint (or packaged weights), which makes the run a fine-tune; without one, the
    checkpoint is the baseline as it is. ``on_trained`` gets the training's statistics
    before the weights are saved (so a kill in between trains, and reports, again). The
    training saves an epoch checkpoint in ``run_dir`` after every epoch and continues from it;
    with several processes (``world``) they train together and rank 0 alone writes.
    """
    path = run_dir / BASELINE
    if path.exists():
        model.load_state_dict(load_state(path))
        return
    if recipe.train is not None and not trained:  # from its checkpoint (or packaged weights): a fine-tune
        verb = "fine-tuning" if recipe.model.checkpoint is not None or is_pretrained(recipe.model) else "training"
        console.print(f"[bold]baseline[/]: {verb} {recipe.model.name} for {recipe.train.epochs} epoch(s)")
        try:
            stats = train(model, data.train, config=recipe.train, objective=supervised(recipe.task.loss),
                          seed=recipe.seed, progress=True, description="baseline", world=world,
                          checkpoint=epoch_checkpoint(run_dir, "baseline"))
        except NonFiniteLoss as exc:
            raise diverged("baseline training", exc, data.train, key="train.optimizer.lr") from None
        if on_trained is not None and world.main:
            on_trained(stats)
    elif recipe.model.checkpoint is None and not trained and not is_pretrained(recipe.model):
        raise RecipeError(
            f"model {recipe.model.name!r} has no 'model.checkpoint' and the recipe has no 'train' section: "
            "give trained weights or a training stage"
        )
    if world.main:
        save_weights(model, path)
        clear_epoch_checkpoint(run_dir)


def _commit(state: RunState, ctx: RunContext) -> RunState:
    """Save ``state`` (rank 0) — the commit point of a step, after which its epoch checkpoint
    is no longer needed — and give every rank rank 0's state, so all take the same next step."""
    if ctx.world.main:
        save_run_state(ctx.run_dir, state)
        clear_epoch_checkpoint(ctx.run_dir)
    return ctx.world.broadcast(state)


REACHED = 1e-4
"""A stage's progress this close below its target counts as reaching it: whole weights and
channels cannot hit a fraction exactly (0.945 of 430,500 weights is 1.2e-6 short of it), and a
one-weight round with the last round's full recovery is worth nothing."""


NON_FINITE = "non-finite loss"
"""A round's `RoundRecord.reason` when its recovery's loss turned NaN or inf."""


def _diverged(state: RunState) -> str:
    """Why the spiral stopping now may not be the schedule's doing: the last round's recovery
    diverged (its loss turned NaN/inf), which a smaller step rarely cures; else nothing."""
    if state.rounds and state.rounds[-1].reason == NON_FINITE:
        return (" (the last round's recovery diverged: non-finite loss; lower recipe key "
                "'recover.train.optimizer.lr')")
    return ""


def _stage_step(state: RunState, ctx: RunContext) -> tuple[float | None, str | None]:
    """The current stage's progress target for the next round, or why the stage ends."""
    stage, targets = ctx.recipe.prune[state.stage], ctx.recipe.targets
    target = stage.goal
    if state.progress >= target - REACHED:
        return None, f"target {stage.progress_name} {target:.3f} reached"
    proposal = next_sparsity(stage.schedule, current=state.progress, target=target, rounds_done=state.stage_accepted)
    step = (proposal - state.progress) * state.scale
    final_full_step = state.scale == 1.0 and proposal >= target
    if step < targets.min_step and not final_full_step:
        return None, f"next step {step:.4f} below min_step {targets.min_step}{_diverged(state)}"
    return min(state.progress + step, target), None


def _end_stage(state: RunState, why: str, pruned: Pruned, ctx: RunContext) -> None:
    """Record why the current stage ended and start the next one from where the model is."""
    stage = ctx.recipe.prune[state.stage]
    state.stage_stops.append(f"stage {state.stage + 1} ({stage.kind}): {why}" if len(ctx.recipe.prune) > 1 else why)
    state.stage, state.stage_accepted, state.scale = state.stage + 1, 0, 1.0
    if state.stage < len(ctx.recipe.prune) and state.baseline is not None:
        following = ctx.recipe.prune[state.stage]
        state.progress = following.progress(pruned.model, pruned.masks, stage_context(following, state.baseline, ctx))


def _next_target(state: RunState, pruned: Pruned, ctx: RunContext) -> float | None:
    """The target of the next round, moving on through finished stages; None when the spiral stops."""
    while state.stage < len(ctx.recipe.prune):
        target, why = _stage_step(state, ctx)
        if target is None:
            _end_stage(state, why or "", pruned, ctx)
        elif len(state.rounds) >= ctx.recipe.targets.max_rounds:
            state.stopped = "; ".join([*state.stage_stops, f"max_rounds {ctx.recipe.targets.max_rounds} reached{_diverged(state)}"])
            return None
        else:
            return target
    state.stopped = "; ".join(state.stage_stops) or "no pruning stage"
    return None


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
    cut = stage.cut(candidate, pruned.masks, target=target, ctx=stage_context(stage, state.baseline, ctx))
    masks = ctx.world.broadcast(cut.masks)  # every rank prunes the same weights (and `train` checks the shapes)
    objective = stage.recovery(ctx.recover.objective(task=recipe.task, teacher=ctx.teacher, cache=ctx.cache))
    reason = ""
    losses: tuple[float, ...] = ()  # none after a non-finite loss
    recovery = ctx.recover.round_train(last=target >= stage.goal - REACHED)
    try:
        losses = train(candidate, ctx.data.train, config=recovery, objective=objective, seed=seed,
                       masks=masks, progress=True, description=f"round {index} recover", world=ctx.world,
                       checkpoint=epoch_checkpoint(ctx.run_dir, f"round {index} recover")).epoch_losses
    except NonFiniteLoss as exc:
        ctx.console.print(f"round {index}: {exc}")
        reason = NON_FINITE
    metrics = measure_model(candidate, ctx)
    if not reason:
        drop = metric_drop(recipe.task, baseline=state.baseline.val_metric, value=metrics.val_metric)
        if not within_tolerance(recipe.task, baseline=state.baseline.val_metric, value=metrics.val_metric,
                                tolerance=recipe.targets.max_metric_drop):
            reason = f"val drop {drop:.2f} > {recipe.targets.max_metric_drop}"
    record = RoundRecord(
        **metrics.model_dump(), index=index, stage=state.stage + 1, progress=stage.progress_name, target=target,
        accepted=not reason, seconds=time.perf_counter() - started, reason=reason or "kept", epochs=recovery.epochs,
        predicted_latency_ms=cut.predicted_ms, measured_latency_ms=cut.measured_ms,
        prediction_runtime=(stage.runtime or "eager") if cut.predicted_ms is not None else None,
    )
    if ctx.world.main:
        record_training(ctx.run_dir, TrainingCurve(label=f"round {index}", round=index, losses=losses,
                                                   val_metric=record.val_metric, accepted=record.accepted))
    plans = pruned.plans + ((cut.plan,) if cut.plan is not None else ())
    return Pruned(model=candidate, masks=masks, plans=plans), record


def _spiral(model: nn.Module, state: RunState, ctx: RunContext) -> tuple[Pruned, RunState]:
    assert state.baseline is not None, "the baseline is measured before any round"
    pruned = load_round(ctx.run_dir, state.checkpoint, model) if state.checkpoint else Pruned(model=model)
    if not state.rounds and state.stage < len(ctx.recipe.prune):  # e.g. a student is already smaller
        first = ctx.recipe.prune[state.stage]
        state.progress = first.progress(pruned.model, pruned.masks, stage_context(first, state.baseline, ctx))
    while True:
        target = _next_target(state, pruned, ctx)
        if target is None:
            return pruned, _commit(state, ctx)
        index = len(state.rounds) + 1
        stage = ctx.recipe.prune[state.stage]
        candidate, record = _run_round(pruned, target, state, ctx, index=index)
        state.rounds.append(record)
        if record.accepted:
            before, pruned = state.progress, candidate
            state.accepted += 1
            state.stage_accepted += 1
            state.progress = stage.progress(pruned.model, pruned.masks, stage_context(stage, state.baseline, ctx))
            if ctx.world.main:
                state.checkpoint = save_round(ctx.run_dir, index, pruned)
            if state.progress <= before + 1e-6:
                _end_stage(state, f"round {index} could not prune further", pruned, ctx)
        else:
            state.scale /= 2
        state = _commit(state, ctx)
        verdict = "[green]kept[/]" if record.accepted else f"[red]rolled back[/]: {record.reason}"
        ctx.console.print(
            f"round {index}: {record.progress} {100 * target:.1f}% → val {record.val_metric:.2f}, "
            f"{ctx.recipe.task.metric_name} {record.metric:.2f}, {record.macs:,} MACs — {verdict} "
            f"({record.seconds:.1f} s)"
        )


def _finish(result: Pruned, state: RunState, ctx: RunContext) -> None:
    """Save the pruned model (dense and sparse layouts, plans), quantize it if asked, measure both.

    With several processes rank 0 saves, quantizes and measures; the others take part only
    in a quantization-aware training (writing into a scratch directory), and get the results
    with the state rank 0 commits next.
    """
    model = result.model
    pruned = measure_model(model, ctx)
    recipe = ctx.recipe
    trains = getattr(recipe.quantize, "qat", None) is not None  # a stage that may train runs on every rank
    if not ctx.world.main:
        if recipe.quantize is not None and trains:
            with tempfile.TemporaryDirectory(prefix="spiralkit-rank-") as scratch:
                _quantize(result, pruned, state, ctx, directory=Path(scratch))
        return
    dense_bytes = save_weights(model, ctx.run_dir / MODEL)
    sparse_bytes = save_sparse(model, ctx.run_dir / MODEL_SPARSE)
    if result.plans:
        write_plans(ctx.run_dir / PLANS, result.plans)
    pruned = pruned.model_copy(update={"size_bytes": min(sparse_bytes, dense_bytes), "dense_size_bytes": dense_bytes})
    if recipe.quantize is None:
        state.final = pruned
        return
    _quantize(result, pruned, state, ctx, directory=ctx.run_dir, world=ctx.world if trains else SINGLE)


def _quantize(result: Pruned, pruned: Metrics, state: RunState, ctx: RunContext, *, directory: Path,
              world: World | None = None) -> None:
    """Quantize the pruned model into ``directory`` and record it in ``state`` (rank 0's is the one kept)."""
    recipe, model, masks = ctx.recipe, result.model, result.masks
    assert recipe.quantize is not None
    baseline_val = state.baseline.val_metric if state.baseline else pruned.val_metric
    inputs = StageInputs(
        spec=recipe.model, teacher=ctx.teacher, task=recipe.task, train_loader=ctx.data.train, masks=masks,
        evaluate=lambda m: evaluate(recipe.task, m, ctx.data.val, reference=ctx.reference).metric,
        baseline_val=baseline_val, pruned_val=pruned.val_metric, max_metric_drop=recipe.targets.max_metric_drop,
        seed=recipe.seed + 999_999, directory=directory, example=ctx.example, threads=recipe.measure.threads,
        world=world or ctx.world, checkpoint=epoch_checkpoint(ctx.run_dir, "quantization-aware training"),
    )
    quantized = recipe.quantize.run(model, inputs)
    if not ctx.world.main:
        return
    state.pruned = pruned
    state.final = _quantized_metrics(quantized, pruned, ctx)
    state.quantization = QuantInfo(
        kind=recipe.quantize.kind, method=quantized.method, bits=quantized.bits,
        artefact=str(quantized.artefact.relative_to(directory)),
    )
    ctx.console.print(f"quantized ({quantized.method}): {recipe.task.metric_name} {state.final.metric:.2f}, "
                      f"{quantized.size_bytes:,} bytes")


def _quantized_metrics(quantized: Quantized, pruned: Metrics, ctx: RunContext) -> Metrics:
    """Metrics of the quantized model, whose size is its artefact's.

    An ONNX Runtime model has no torch parameters (its weights live in the file): its
    parameter counts and MACs are the pruned model's, since the integer kernels do the
    same multiply-accumulates.
    """
    final = measure_here(quantized.model, ctx)
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
        **state.outcome(),
    )


def _prepare_run_dir(recipe: Recipe, run_dir: Path, *, resume: bool) -> None:
    """Check that ``recipe`` may write ``run_dir`` (the caller holds its lock); a new run saves its recipe.

    A directory that holds a recipe is continued only by a recipe with the same fingerprint
    (`spiralkit.spiral.fingerprint`): never by another recipe, even before its first state.
    """
    has_recipe = (run_dir / RECIPE).exists()
    if resume and not has_recipe:
        raise SpiralError(f"cannot resume {run_dir}: it holds no recipe.yaml (not a run directory)")
    if not resume and (run_dir / STATE).exists():
        raise SpiralError(f"{run_dir} already holds a run; resume it with --resume or choose another --out")
    if has_recipe:
        saved = run_fingerprint(run_dir)
        assert saved is not None, "a directory with a recipe has a fingerprint"
        if not (run_dir / FINGERPRINT).exists():  # written before fingerprints: keep the recipe's from now on
            write_fingerprint(run_dir, saved)
        check_fingerprint(run_dir, recipe, saved=saved)
        return
    atomic_write_text(run_dir / RECIPE, dump_recipe(recipe))
    write_fingerprint(run_dir, fingerprint(recipe))


class Spiral:
    """Runs a recipe: ``Spiral(recipe).run(run_dir)``.

    Args:
        recipe: the validated recipe.
        allow_code: run a recipe whose model or data is ``package.module:function`` (imported
            and called). Off by default: a recipe file from someone else runs no code of theirs.
    """

    def __init__(self, recipe: Recipe, *, allow_code: bool = False) -> None:
        self.recipe = recipe
        self.allow_code = allow_code

    def run(
        self,
        run_dir: Path,
        *,
        resume: bool = False,
        model: nn.Module | None = None,
        data: DataSplits | None = None,
        console: Console | None = None,
        world: World = SINGLE,
    ) -> Report:
        """Run (or resume) the spiral in ``run_dir`` and return its report.

        Args:
            run_dir: where checkpoints, state and the report go.
            resume: continue the run already in ``run_dir``.

        Raises:
            RecipeError: the recipe names code and ``allow_code`` is off, or does not fit
                the model; nothing is trained or written then.
            SpiralError: another process is writing ``run_dir``, or it holds another
                recipe's run.
            model: a trained model to compress instead of ``recipe.model`` (used as is).
            data: data splits to use instead of ``recipe.data``.
            console: where progress is printed.
            world: the data-parallel processes running the recipe together (torchrun): all
                train, rank 0 alone evaluates, holds the run directory's lock and writes it.
        """
        recipe, run_dir = self.recipe, Path(run_dir)
        recipe.check_code(allow_code=self.allow_code)
        console = console or Console()
        if not world.main:
            console = Console(quiet=True)
            world.barrier()  # rank 0 holds the lock and has checked the directory
            return self._run(run_dir, model=model, data=data, console=console, world=world)
        with run_lock(run_dir):
            _prepare_run_dir(recipe, run_dir, resume=resume)
            world.barrier()
            return self._run(run_dir, model=model, data=data, console=console, world=world)

    def _run(self, run_dir: Path, *, model: nn.Module | None, data: DataSplits | None, console: Console,
             world: World) -> Report:
        recipe = self.recipe
        # the recipe's threads are the run's: shared by its processes
        threads = max(1, recipe.threads // world.size) if recipe.threads else None
        with torch_threads(threads):
            data = data or load_data(recipe.data, seed=recipe.seed)
            if world.parallel:
                batch = getattr(data.train, "batch_size", None)
                console.print(f"data-parallel: {world}, {threads or torch.get_num_threads()} thread(s) each; "
                              f"global batch {batch}, {batch // world.size if batch else '?'} per process")
            trained = model is not None
            torch.manual_seed(recipe.seed)  # the model's random init is part of the run
            model = model if model is not None else load_model(recipe.model)
            example = example_input(data, recipe.measure.batch_size)
            if recipe.student is None:  # a student's layer names are known once it is built
                recipe.check_model(model, example)
            train_baseline(model, recipe, data, run_dir, trained=trained, console=console, world=world,
                           on_trained=lambda stats: record_training(
                               run_dir, TrainingCurve(label="baseline", losses=stats.epoch_losses)))
            teacher = freeze(copy.deepcopy(model))
            recover = fitted_to(recipe.recover, data.train)
            with _teacher_cache(recover) as cache, TeacherCache(budget_mb=_REFERENCE_CACHE_MB, disk_budget_mb=0) as outputs:
                ctx = RunContext(recipe=recipe, data=data, teacher=teacher, reference=CachedModel(teacher, outputs),
                                 example=example, run_dir=run_dir, console=console, recover=recover, cache=cache,
                                 world=world)
                state = world.broadcast(load_run_state(run_dir) if world.main else None)
                if state.final is None:
                    state.processes = world.size
                if state.baseline is None:
                    state.baseline = measure_model(model, ctx)
                    state = _commit(state, ctx)
                if state.final is None:
                    if recipe.student is not None:
                        model = run_student(recipe.student, model, state, ctx)
                    result, state = _spiral(model, state, ctx)
                    _finish(result, state, ctx)
                    state = _commit(state, ctx)
        report = build_report(recipe, state)
        if not world.main:
            return report
        write_report(report, run_dir)
        write_html_report(report, run_dir, recipe_text=dump_recipe(recipe), weights=run_dir / MODEL,
                          curves=load_curves(run_dir))
        print_report(report, console)
        return report
