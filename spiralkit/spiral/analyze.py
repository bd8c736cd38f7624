"""`spiral analyze`: how sensitive each layer of a recipe's trained model is, before compressing it.

A scan without recovery, on the validation split (its first ``limit`` examples): for every
Linear/Conv layer, the metric with *only* that layer's weight pruned by magnitude at each
sparsity, and with only that weight quantized at each bit width
(`spiralkit.quant.mixed.sensitivity_scan`, the compact artefact's quantizer); for every
structured channel group (`spiralkit.prune.structured.planner`), the metric with only that
group's channels masked at each channel ratio; for every attention layer, the metric with
only that layer's lowest-scored heads masked at each head ratio; for every removable residual
block or transformer layer (`spiralkit.graph.blocks`), the metric with only that block
removed; and each layer's share of the parameters, MACs and measured latency (one forward
pass at the recipe's ``measure`` batch, threads, warm-up and repeats, timed per module by
`spiralkit.measure.latency_by_module`). Costs ``2 + layers·(ratios + widths) +
groups·channel_ratios + attention layers·head_ratios + blocks`` evaluations.

**Which weights.** The model is the recipe's baseline: with ``from_run``, that run's
``baseline.safetensors``; otherwise trained (or taken from its checkpoint) exactly as
`spiral run` does, and saved as ``OUT/baseline.safetensors``, which the next analysis
into ``OUT`` reuses instead of training again.

**Channel groups and heads** are scored by the recipe's first structured stage's criterion,
include/exclude patterns and ``round_to`` when it has one, else by L2 magnitude.

`suggest` turns an analysis into a recipe fragment (see its docstring).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from rich.console import Console
from rich.progress import Progress
from torch import Tensor, nn

from spiralkit.data import DataSplits, load_data
from spiralkit.data.loaders import Loader
from spiralkit.distill.cache import CachedModel, TeacherCache
from spiralkit.errors import SpiralError
from spiralkit.export import load_state
from spiralkit.graph.blocks import Block, find_blocks, remove_blocks
from spiralkit.graph.groups import call_model
from spiralkit.measure import count_macs, count_macs_by_module, count_params, latency_by_module
from spiralkit.models import load_model
from spiralkit.modules import torch_threads
from spiralkit.prune.apply import apply_plan
from spiralkit.prune.structured import Planner, StructuredPrune, planner
from spiralkit.prune.unstructured import apply_masks, masks_for_sparsity
from spiralkit.quant.affine import PerChannel, PerTensor
from spiralkit.quant.mixed import quantizable_layers, sensitivity_scan
from spiralkit.report.analysis import (
    Analysis,
    BlockAnalysis,
    GroupAnalysis,
    HeadAnalysis,
    LayerAnalysis,
    ModuleLatency,
    Sample,
    write_analysis,
)
from spiralkit.spiral.context import example_input
from spiralkit.spiral.prune import StructuredStage, UnstructuredStage
from spiralkit.spiral.quantize import CompactQuant
from spiralkit.spiral.recipe import Recipe
from spiralkit.spiral.rundir import BASELINE
from spiralkit.spiral.runner import train_baseline
from spiralkit.tasks import evaluate, metric_drop

__all__ = ["SCANS", "AnalyzeConfig", "analyze", "fewest_bits", "scans_only", "suggest"]

Evaluate = Callable[[nn.Module], float]


@dataclass(frozen=True)
class AnalyzeConfig:
    """What `analyze` scans.

    Attributes:
        limit: measure on the first ``limit`` validation examples (None: all of them).
        from_run: a run directory whose ``baseline.safetensors`` is the model to analyse.
        prune_ratios: sparsities of the one-layer magnitude pruning, each in [0, 1).
        channel_ratios: fractions of a channel group's channels removed, each in [0, 1).
        head_ratios: fractions of an attention layer's heads removed, each in [0, 1).
        bits: weight bit widths (2..8) of the one-layer quantization.
        depth: remove each residual block or transformer layer alone.
        split: the split measured on: ``val`` (carved from the training data, what a run decides
            on) or ``test`` (the held-out split, e.g. SST-2's dev sentences).
        allow_code: analyse a recipe whose model or data names code to import.
    """

    limit: int | None = None
    from_run: Path | None = None
    prune_ratios: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)
    channel_ratios: tuple[float, ...] = (0.25, 0.5, 0.75)
    head_ratios: tuple[float, ...] = (0.25, 0.5, 0.75)
    bits: tuple[int, ...] = (8, 6, 4, 3, 2)
    depth: bool = True
    split: Literal["val", "test"] = "val"
    allow_code: bool = False

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise SpiralError(f"--limit must be at least 1 validation example, got {self.limit}")
        if self.split not in ("val", "test"):
            raise SpiralError(f"--split must be 'val' or 'test', got {self.split!r}")
        for name in ("prune_ratios", "channel_ratios", "head_ratios"):
            bad = [r for r in getattr(self, name) if not 0 <= r < 1]
            if bad:
                raise SpiralError(f"{name} must be in [0, 1), got {bad[0]}")


SCANS = ("weights", "bits", "channels", "heads", "depth")
"""What `scans_only` can keep: one-layer magnitude pruning, one-layer quantization, channel
groups, attention heads, and blocks removed (depth)."""


def scans_only(config: AnalyzeConfig, scans: Sequence[str]) -> AnalyzeConfig:
    """``config`` scanning only ``scans`` (names from `SCANS`); the others get no settings.

    Raises:
        SpiralError: a name not in `SCANS`.
    """
    unknown = [s for s in scans if s not in SCANS]
    if unknown:
        raise SpiralError(f"unknown --scan {unknown[0]!r}: choose from {', '.join(SCANS)}")
    chosen = set(scans)
    return dataclasses.replace(
        config,
        prune_ratios=config.prune_ratios if "weights" in chosen else (),
        bits=config.bits if "bits" in chosen else (),
        channel_ratios=config.channel_ratios if "channels" in chosen else (),
        head_ratios=config.head_ratios if "heads" in chosen else (),
        depth=config.depth and "depth" in chosen,
    )


# --------------------------------------------------------------------------- inputs


REFERENCE_CACHE_MB = 256.0
"""The fidelity reference's outputs on the scanned examples, computed once (as in a run)."""

EVAL_BATCH = 512
"""`first_examples` joins batches up to this many examples: a scan evaluates the same examples
dozens of times, and larger batches run faster (LeNet-5 on 2,000 MNIST images: ~30%)."""


def first_examples(loader: Loader, limit: int | None, *, batch_size: int = EVAL_BATCH) -> Loader | list[tuple[Tensor, Tensor]]:
    """The first ``limit`` examples of ``loader``, in memory, as batches of up to ``batch_size`` (the
    loader's own batches joined; larger ones kept whole). ``None`` returns ``loader`` itself.
    """
    if limit is None:
        return loader
    batches: list[tuple[Tensor, Tensor]] = []
    left = limit
    for x, y in loader:
        if left <= 0:
            break
        x, y = x[:left], y[:left]
        left -= y.shape[0]
        if batches and batches[-1][1].shape[0] + y.shape[0] <= batch_size:
            x, y = torch.cat([batches[-1][0], x]), torch.cat([batches[-1][1], y])
            batches.pop()
        batches.append((x, y))
    return batches


def baseline_model(recipe: Recipe, data: DataSplits, out: Path, *, from_run: Path | None, console: Console) -> nn.Module:
    """The recipe's trained model: ``from_run``'s baseline, or trained (once) into ``out`` as `spiral run` does.

    Raises:
        SpiralError: ``from_run`` has no baseline, or its weights do not fit the recipe's model.
        RecipeError: the model has neither a checkpoint nor a ``train`` section.
    """
    torch.manual_seed(recipe.seed)  # the model's random init, as in a run
    model = load_model(recipe.model)
    if from_run is None:
        train_baseline(model, recipe, data, out, trained=False, console=console)
        return model
    path = Path(from_run) / BASELINE
    if not path.is_file():
        raise SpiralError(f"{from_run} holds no {BASELINE}: give a run directory whose baseline is trained")
    try:
        model.load_state_dict(load_state(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise SpiralError(f"{path} does not fit model {recipe.model.name!r} of the recipe: {first}") from None
    return model


# --------------------------------------------------------------------------- scans


def _samples(metrics: Sequence[tuple[float, float]], baseline: float, drop: Callable[[float, float], float]) -> tuple[Sample, ...]:
    return tuple(Sample(setting=s, metric=m, drop=drop(baseline, m)) for s, m in metrics)


def prune_scan(model: nn.Module, evaluate: Evaluate, *, layers: Sequence[str], ratios: Sequence[float]) -> dict[str, list[tuple[float, float]]]:
    """``(sparsity, metric)`` per layer, with only that layer's weight pruned by magnitude (``|w|``).

    ``model`` is not modified: one copy is pruned and its weight restored after each entry.
    """
    probe = copy.deepcopy(model)
    modules = dict(probe.named_modules())
    result: dict[str, list[tuple[float, float]]] = {}
    for name in layers:
        weight = modules[name].weight
        original = weight.detach().clone()
        key = f"{name}.weight"
        row = []
        for ratio in ratios:
            apply_masks(probe, masks_for_sparsity({key: original.abs()}, sparsity=ratio))
            row.append((ratio, evaluate(probe)))
            with torch.no_grad():
                weight.copy_(original)
        result[name] = row
    return result


def channel_planner(model: nn.Module, recipe: Recipe, data: DataSplits, example: Tensor) -> Planner:
    """The structured planner of the recipe's first structured stage (or L2 magnitude), heads included, no depth."""
    stage = next((s for s in recipe.prune if isinstance(s, StructuredStage)), None)
    update = {"heads": True, "depth": 0}
    config = stage.step().model_copy(update=update) if stage else StructuredPrune(ratio=0.0, **update)
    return planner(model, config, example=example, batches=data.train, loss_fn=recipe.task.loss)


def channel_scan(model: nn.Module, evaluate: Evaluate, *, plans: Planner, ratios: Sequence[float]) -> dict[str, list[tuple[float, float]]]:
    """``(channel ratio, metric)`` per channel group, with only that group's channels masked."""
    result: dict[str, list[tuple[float, float]]] = {}
    for group in plans.channels:
        alone = dataclasses.replace(plans, channels=(group,), heads=(), blocks=())
        result[group.id] = [(ratio, evaluate(apply_plan(copy.deepcopy(model), alone(ratio), mode="mask")))
                            for ratio in ratios]
    return result


def head_scan(model: nn.Module, evaluate: Evaluate, *, plans: Planner, ratios: Sequence[float]) -> dict[str, list[tuple[float, float]]]:
    """``(head ratio, metric)`` per attention layer, with only that layer's lowest-scored heads masked."""
    result: dict[str, list[tuple[float, float]]] = {}
    for head in plans.heads:
        alone = dataclasses.replace(plans, channels=(), heads=(head,), blocks=())
        result[head.module] = [(ratio, evaluate(apply_plan(copy.deepcopy(model), alone(ratio), mode="mask")))
                               for ratio in ratios]
    return result


def removable_blocks(model: nn.Module, val: Loader | list[tuple[Tensor, Tensor]], *, examples: int = 32) -> tuple[Block, ...]:
    """The residual blocks and transformer layers that can be removed, with their block influence
    measured on the first ``examples`` examples of ``val``."""
    x, _ = next(iter(val))
    return find_blocks(model, [x[:examples]], call=call_model)


def block_scan(model: nn.Module, evaluate: Evaluate, *, blocks: Sequence[Block]) -> dict[str, float]:
    """The metric per block, with only that block removed."""
    result: dict[str, float] = {}
    for block in blocks:
        probe = copy.deepcopy(model)
        remove_blocks(probe, [block.module])
        result[block.module] = evaluate(probe)
    return result


def latency_shares(model: nn.Module, example: Tensor, recipe: Recipe) -> tuple[float, dict[str, float]]:
    """The median forward pass (ms) at the recipe's measurement settings, and each module's share of it."""
    m = recipe.measure
    # At least one untimed pass: the first one pays for lazy initialisation in every module.
    times = latency_by_module(model, example, threads=m.threads, warmup=max(1, m.warmup), repeats=m.repeats)
    total = times.pop("")
    return total, {name: ms / total if total > 0 else 0.0 for name, ms in times.items()}


def _innermost_latency(model: nn.Module, total: float, shares: dict[str, float]) -> tuple[ModuleLatency, ...]:
    """The modules that ran while none of their submodules did, in model order: the leaves, and modules
    such as ``nn.MultiheadAttention`` that compute with their children's weights without calling them."""
    return tuple(
        ModuleLatency(name=name, type=type(module).__name__, ms=shares[name] * total, share=shares[name])
        for name, module in model.named_modules()
        if name in shares and not any(f"{name}.{sub}" in shares for sub, _ in module.named_modules() if sub)
    )


def module_costs(model: nn.Module, example: Tensor, names: Sequence[str]) -> dict[str, tuple[int, float, float]]:
    """``(params, share of params, share of MACs)`` per named module (e.g. an attention layer or a block), for one example."""
    if not names:
        return {}
    one = example[:1]
    macs, total_macs = count_macs_by_module(model, one), count_macs(model, one)
    total_params = count_params(model).total
    costs = {}
    for name in names:
        params = sum(p.numel() for p in model.get_submodule(name).parameters())
        costs[name] = (params, params / total_params if total_params else 0.0,
                       macs.get(name, 0) / total_macs if total_macs else 0.0)
    return costs


def layer_costs(model: nn.Module, example: Tensor, layers: Sequence[str]) -> dict[str, tuple[int, float, int, float]]:
    """``(params, share of params, MACs, share of MACs)`` per layer, for one example."""
    one = example[:1]
    macs, total_macs = count_macs_by_module(model, one), count_macs(model, one)
    total_params = count_params(model).total
    modules = dict(model.named_modules())
    costs = {}
    for name in layers:
        params = sum(p.numel() for p in modules[name].parameters())
        layer_macs = macs.get(name, 0)
        costs[name] = (params, params / total_params if total_params else 0.0,
                       layer_macs, layer_macs / total_macs if total_macs else 0.0)
    return costs


def _granularity(recipe: Recipe) -> PerTensor | PerChannel:
    """The recipe's compact quantizer's granularity; per channel when it has none."""
    if isinstance(recipe.quantize, CompactQuant) and recipe.quantize.granularity == "per-tensor":
        return PerTensor()
    return PerChannel()


# --------------------------------------------------------------------------- the analysis


def analyze(recipe: Recipe, out: Path, config: AnalyzeConfig, *, console: Console | None = None) -> Analysis:
    """Scan the recipe's trained model and write ``OUT/analysis.json`` and ``OUT/analysis.html``.

    Args:
        recipe: the validated recipe.
        out: the output directory (created).
        config: what to scan and on how many examples.
        console: where progress goes.

    Returns:
        The analysis.

    Raises:
        RecipeError: the recipe names code and ``config.allow_code`` is off, or it has no way
            to a trained model.
        SpiralError: ``config.from_run`` has no fitting baseline.
    """
    recipe.check_code(allow_code=config.allow_code)
    console = console or Console(stderr=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with torch_threads(recipe.threads), ExitStack() as stack:
        data = load_data(recipe.data, seed=recipe.seed)
        split = data.val if config.split == "val" else data.test
        if split is None:
            raise SpiralError(f"data {recipe.data.name!r} has no test split: analyse with --split val")
        model = baseline_model(recipe, data, out, from_run=config.from_run, console=console)
        val = first_examples(split, config.limit)
        example = example_input(data, 1)
        layers = quantizable_layers(model)
        plans = channel_planner(model, recipe, data, example)
        blocks = removable_blocks(model, val) if config.depth else ()
        latency_ms, shares = latency_shares(model, example_input(data, recipe.measure.batch_size), recipe)
        reference = CachedModel(model, stack.enter_context(TeacherCache(budget_mb=REFERENCE_CACHE_MB, disk_budget_mb=0)))
        first = evaluate(recipe.task, model, val, reference=reference)
        total = 1 + len(layers) * (len(config.prune_ratios) + len(config.bits)) \
            + len(plans.channels) * len(config.channel_ratios) + len(plans.heads) * len(config.head_ratios) + len(blocks)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"analysing {recipe.name}", total=total)

            def measure(m: nn.Module) -> float:
                value = evaluate(recipe.task, m, val, reference=reference).metric
                progress.advance(task)
                return value

            baseline = first.metric
            pruned = prune_scan(model, measure, layers=layers, ratios=config.prune_ratios)
            quant = sensitivity_scan(model, evaluate=measure, layers=layers, bits=config.bits,
                                     granularity=_granularity(recipe)).metrics if config.bits else {}
            channels = channel_scan(model, measure, plans=plans, ratios=config.channel_ratios)
            heads = head_scan(model, measure, plans=plans, ratios=config.head_ratios)
            without = block_scan(model, measure, blocks=blocks)
        costs = layer_costs(model, example, layers)
        wholes = module_costs(model, example, [h.module for h in plans.heads] + [b.module for b in blocks])

    def drop(base: float, value: float) -> float:
        return metric_drop(recipe.task, baseline=base, value=value)

    modules = dict(model.named_modules())
    widths = sorted(config.bits, reverse=True)
    analysis = Analysis(
        recipe=recipe.name, metric=recipe.task.metric_name, higher_is_better=recipe.task.higher_is_better,
        examples=first.examples, baseline=baseline, seconds=time.perf_counter() - started,
        layers=tuple(
            LayerAnalysis(name=name, type=type(modules[name]).__name__, params=costs[name][0],
                          param_share=costs[name][1], macs=costs[name][2], mac_share=costs[name][3],
                          prune=_samples(pruned[name], baseline, drop),
                          quant=_samples([(b, quant[name][b]) for b in widths], baseline, drop),
                          latency_share=shares.get(name))
            for name in layers
        ),
        groups=tuple(
            GroupAnalysis(id=group.id, channels=group.size, prune=_samples(channels[group.id], baseline, drop),
                          layers=tuple(dict.fromkeys(m.module for m in group.producers())))
            for group in plans.channels
        ),
        heads=tuple(
            HeadAnalysis(module=h.module, heads=h.num_heads, param_share=wholes[h.module][1],
                         mac_share=wholes[h.module][2], latency_share=shares.get(h.module),
                         prune=_samples(heads[h.module], baseline, drop))
            for h in plans.heads
        ),
        blocks=tuple(
            BlockAnalysis(module=b.module, influence=b.influence, params=wholes[b.module][0],
                          param_share=wholes[b.module][1], mac_share=wholes[b.module][2],
                          latency_share=shares.get(b.module), metric=without[b.module],
                          drop=drop(baseline, without[b.module]))
            for b in blocks
        ),
        latency_ms=latency_ms,
        latency_batch=recipe.measure.batch_size,
        latency=_innermost_latency(model, latency_ms, shares),
    )
    write_analysis(analysis, out)
    return analysis


# --------------------------------------------------------------------------- suggestions

SUGGEST_RATIO = 0.5
"""A layer (or group) is sensitive when pruning it alone at this ratio drops the metric too much."""


def _drop_at(samples: Sequence[Sample], setting: float) -> float:
    found = [s.drop for s in samples if abs(s.setting - setting) < 1e-9]
    if not found:
        raise SpiralError(f"the analysis has no sample at {setting:g}; scan ratio {SUGGEST_RATIO} to get suggestions")
    return found[0]


def _as_written(stage: Any) -> dict[str, Any]:
    """A recipe stage as the recipe wrote it (the keys it set, and its kind)."""
    return {"kind": stage.kind} | stage.model_dump(mode="json", exclude_unset=True)


def _excluded(stage: Any, sensitive: Sequence[str]) -> dict[str, Any]:
    return _as_written(stage) | {"exclude": list(dict.fromkeys([*stage.exclude, *sensitive]))}


def fewest_bits(samples: Sequence[Sample], max_drop: float) -> int | None:
    """The fewest bits ``b`` such that ``b`` and every wider scanned width drop at most ``max_drop``.

    Asking the wider widths too keeps a lucky narrow width (noise on few examples) from
    being chosen past a wider one that failed. None: even the widest drops too much.
    """
    chosen = None
    for sample in sorted(samples, key=lambda s: -s.setting):
        if sample.drop > max_drop:
            break
        chosen = int(sample.setting)
    return chosen


def suggest(analysis: Analysis, recipe: Recipe, *, max_drop: float | None = None) -> str:
    """A YAML recipe fragment from an analysis: its top-level keys replace the recipe's.

    - ``prune``: the recipe's prune stages, each excluding its sensitive layers — an
      unstructured stage the layers whose weight pruned alone to sparsity 0.5 drops the
      metric by more than ``max_drop``; a structured stage the layers computing the channel
      groups that drop it that much at channel ratio 0.5. (No key when the recipe does not prune.)
    - ``quantize``: a compact stage (the recipe's own when it has one) with, per layer, the
      fewest bits whose drop is at most ``max_drop`` (`fewest_bits`); a layer without one
      stays in float (it has no ``bits`` entry). Left out after structured pruning, which compact
      quantization cannot follow.

    Args:
        analysis: from `analyze` (with ratio 0.5 scanned).
        recipe: the analysed recipe.
        max_drop: the tolerated drop (None: the recipe's ``targets.max_metric_drop``).

    Returns:
        YAML text, comments first.

    Raises:
        SpiralError: the analysis has no sample at ratio 0.5.
    """
    limit = recipe.targets.max_metric_drop if max_drop is None else max_drop
    weights = [layer.name for layer in analysis.layers if _drop_at(layer.prune, SUGGEST_RATIO) > limit]
    channels = [name for group in analysis.groups if _drop_at(group.prune, SUGGEST_RATIO) > limit
                for name in group.layers]
    fragment: dict[str, Any] = {}
    comments = [f"# from `spiral analyze` of {analysis.recipe}: a drop above {limit:g} {analysis.metric} is too much"]
    if recipe.prune:
        fragment["prune"] = [_excluded(stage, weights if isinstance(stage, UnstructuredStage) else channels)
                             for stage in recipe.prune]
    if any(isinstance(s, StructuredStage) for s in recipe.prune):
        comments.append("# no quantize suggestion: kind 'compact' cannot follow structured pruning")
    else:
        bits = {layer.name: b for layer in analysis.layers if (b := fewest_bits(layer.quant, limit)) is not None}
        floats = [layer.name for layer in analysis.layers if layer.name not in bits]
        if floats:
            comments.append(f"# kept in float (every width drops too much): {', '.join(floats)}")
        own = isinstance(recipe.quantize, CompactQuant)
        base = _as_written(recipe.quantize) if own else {"kind": "compact", "granularity": "per-channel"}  # as scanned
        fragment["quantize"] = base | {"bits": bits}
    return "\n".join(comments) + "\n" + yaml.safe_dump(fragment, sort_keys=False)
