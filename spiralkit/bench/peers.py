"""``spiral bench --peers``: spiralkit against the tools people use instead, same model, budget and machine.

Every method is built in one process, then all are timed round-robin
(`spiralkit.bench.timing.time_interleaved`) at one batch size and thread count:

* ``eager_fp32`` — the dense model in PyTorch eager mode (the speed-up reference);
* ``ort_fp32`` — the dense model in ONNX Runtime;
* ``ort_int8_default`` — ONNX Runtime's own ``quantize_static`` with its defaults (QDQ,
  int8 activations and weights, per-tensor, MinMax) after its recommended ``quant_pre_process``;
* ``spiralkit_int8`` — the dense model through spiralkit's static int8 (see below), for the
  same-model comparison with ``ort_int8_default`` and ``openvino_nncf_int8``;
* ``torchpruning_fp32`` / ``torchpruning_ort_int8`` — Torch-Pruning's ``MetaPruner`` with
  ``GroupMagnitudeImportance(p=2)`` (layer-wise, classifier kept), its ratio bisected to the
  MACs budget; in ONNX Runtime, then through ONNX Runtime's default int8;
* ``torch_prune_unstructured`` — ``torch.nn.utils.prune.l1_unstructured`` on every
  convolution and linear layer, the budget's fraction of weights zeroed, in eager mode (its
  MACs do not fall: zeros are multiplied like any other value);
* ``spiralkit_prune_fp32`` / ``spiralkit_prune_int8`` — spiralkit's structured plan at the
  MACs budget (`spiralkit_plan`), in ONNX Runtime, then through spiralkit's static int8
  (`spiralkit.quant.ptq.StaticInt8`: per-channel symmetric int8 weights, uint8 activations);
* with OpenVINO installed: ``openvino_fp32`` and ``openvino_bf16`` (the dense model with each
  precision hint), ``openvino_nncf_int8`` (NNCF's ``nncf.quantize`` defaults, compiled with
  OpenVINO's default precision), and ``spiralkit_int8_openvino`` / ``spiralkit_prune_int8_openvino``
  (spiralkit's own int8 ``.onnx`` files, dense and pruned, run by OpenVINO: the same integer
  graph on OpenVINO's kernels).

Calibration data: ``calibration_batches`` random normal inputs of the model's input shape,
seeded, for every int8 method alike (no data set is read, so any model can be benchmarked;
weights are as loaded, for torchvision models random). Output agreement (``cosine_to_fp32``)
is measured on other random inputs against each method's float twin.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.table import Table
from torch import Tensor, nn

from spiralkit.bench.core import machine, runtimes_caption
from spiralkit.bench.runtimes import BenchError, runtime
from spiralkit.bench.timing import time_interleaved
from spiralkit.export import save_weights
from spiralkit.export.onnx import compare_outputs, export_onnx
from spiralkit.graph.tp import torch_pruning_prune
from spiralkit.latency import GroupWeight, calibration_ms, choose_widths, narrowest_model, table_for
from spiralkit.latency.runtimes import RUNTIMES, Compiled, openvino_compiled
from spiralkit.measure import Clock, count_macs, size_on_disk
from spiralkit.modules import torch_threads
from spiralkit.prune.apply import apply_plan
from spiralkit.prune.structured import StructuredPrune, planner
from spiralkit.quant.ort import BatchReader
from spiralkit.quant.ptq import QuantizedModel, StaticInt8, quantize
from spiralkit.spiral.prune import search_ratio

__all__ = ["PEERS_SCHEMA", "PLANS", "PeerResult", "PlanFn", "PeersConfig", "PeersReport", "latency_plan", "peers", "peers_table",
           "spiralkit_plan", "torchpruning_plan"]

PEERS_SCHEMA = "spiralkit.bench-peers/1"

PlanFn = Callable[..., nn.Module]
"""``plan(model, example, *, macs, threads) → pruned copy``: how spiralkit's rows prune (default `spiralkit_plan`)."""
_ROUND_TO = 16  # kernel-friendly widths: multiples of 16 keep AVX-512 convolutions in their fast layouts
_MAX_RATIO = 0.95
_EVAL_INPUTS = 4


@dataclass(frozen=True)
class PeersConfig:
    """How the peers are built and timed.

    Attributes:
        macs: The MACs budget: the fraction of the dense model's MACs the pruned models keep.
        batch: Batch size timed.
        threads: Intra-op threads of every runtime.
        warmup: Untimed rounds.
        repeats: Timed rounds.
        calibration_batches: Random inputs the int8 methods calibrate on.
        seed: Seed of the random inputs.
    """

    macs: float = 0.5
    batch: int = 1
    threads: int = 1
    warmup: int = 5
    repeats: int = 30
    calibration_batches: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.macs <= 1:
            raise BenchError(f"--macs is the fraction of the MACs to keep, in (0, 1]; got {self.macs}")
        if self.batch < 1 or self.threads < 1 or self.repeats < 1 or self.warmup < 0 or self.calibration_batches < 1:
            raise BenchError(f"batch, threads, repeats and calibration batches must be >= 1, warmup >= 0; got {self}")


@dataclass(frozen=True)
class PeerResult:
    """One method, measured.

    Attributes:
        name: The method (``spiralkit_prune_int8``, ``torchpruning_ort_int8``, ...).
        description: What it is.
        runtime: What runs it (a `spiralkit.latency.runtimes.RUNTIMES` name).
        latency_ms: Median latency of one batch.
        p10_ms: 10th percentile.
        p90_ms: 90th percentile.
        macs: MACs of one batch of its model (before quantization).
        size_bytes: Its file on disk (``.onnx``, OpenVINO ``.xml`` + ``.bin``, or safetensors).
        speedup_vs_eager_fp32: ``eager_fp32``'s median over this one's.
        twin: The float method its outputs are compared with, or None.
        cosine_to_fp32: Cosine similarity of its outputs to ``twin``'s, or None.
    """

    name: str
    description: str
    runtime: str
    latency_ms: float
    p10_ms: float
    p90_ms: float
    macs: int
    size_bytes: int
    speedup_vs_eager_fp32: float
    twin: str | None = None
    cosine_to_fp32: float | None = None


@dataclass(frozen=True)
class _Built:
    """A method ready to time."""

    name: str
    description: str
    runtime: str
    run: Compiled
    macs: int
    size_bytes: int
    twin: str | None = None


@dataclass(frozen=True)
class PeersReport:
    """What ``spiral bench --peers`` writes as JSON."""

    model: str
    input_shape: tuple[int, ...]
    config: PeersConfig
    calibration: str
    methods: dict[str, PeerResult]
    machine: dict[str, object] = field(default_factory=machine)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready data, ``schema`` first; ``methods`` maps each name to its fields."""
        return {"schema": PEERS_SCHEMA, **asdict(self)}


# --------------------------------------------------------------------------- plans


def spiralkit_plan(model: nn.Module, example: Tensor, *, macs: float, threads: int = 1) -> nn.Module:
    """spiralkit's pruned model for the peers table: structured, L2 magnitude, widths multiples of 16.

    The channel ratio is bisected (`spiralkit.spiral.prune.search_ratio`) to the largest
    model with at most ``macs`` of the dense MACs. One function, so that the latency-aware
    planner can take its place.

    Args:
        model: The dense model (not changed).
        example: An input batch.
        macs: The fraction of the MACs to keep.
        threads: Unused (the plan counts MACs, it times nothing).

    Returns:
        A pruned copy.
    """
    config = StructuredPrune(ratio=0.0, round_to=_ROUND_TO)
    plan_for = planner(model, config, example=example)
    goal = macs * count_macs(model, example)
    plan = search_ratio(plan_for, model, size=lambda m: float(count_macs(m, example)), goal=goal, max_ratio=_MAX_RATIO)
    return apply_plan(copy.deepcopy(model), plan, mode="remove").eval()


def latency_plan(model: nn.Module, example: Tensor, *, macs: float, runtime: str = "ort", threads: int = 1,
                 step: int = 32, weigh: GroupWeight = "layers", clock: Clock = "wall", iterations: int = 12) -> nn.Module:
    """spiralkit's latency-aware plan at the MACs budget: the fastest widths the table knows, within ``macs``.

    The model's blocks are tabled on ``runtime`` at widths that are multiples of ``step``
    (`spiralkit.latency.table_for`, cached on disk), the prediction is calibrated on the
    dense model and its narrowest copy, and the latency target is bisected to the largest
    whose plan (`spiralkit.latency.choose_widths`, groups weighed by ``weigh``) has at most
    ``macs`` of the dense MACs: for that budget, widths chosen by measured speed, not by a
    uniform ratio.

    Args:
        model: The dense model (not changed).
        example: An input batch (its batch size is the table's).
        macs: The fraction of the MACs to keep.
        runtime, threads, clock: Where the table and calibration are measured.
        step: The width grid's step.
        weigh: How the planner compares groups (`spiralkit.latency.group_weights`).
        iterations: Bisection steps on the latency target.

    Returns:
        A pruned copy (every group at its narrowest width when no plan fits the budget).
    """
    plan_for = planner(model, StructuredPrune(ratio=0.0), example=example)
    blocks, table = table_for(plan_for, model, example, runtime=runtime, threads=threads, step=step, clock=clock)
    full_ms, narrow_ms = calibration_ms(model, plan_for, example, runtime=runtime, threads=threads, step=step,
                                        clock=clock)
    goal = macs * count_macs(model, example)

    def pruned(target_ms: float) -> nn.Module:
        chosen = choose_widths(plan_for, blocks, table, target_ms=target_ms, measured_ms=full_ms, narrowest_ms=narrow_ms,
                               step=step, strict=False, weigh=weigh)
        return apply_plan(copy.deepcopy(model), chosen.plan, mode="remove")

    # The fallback is every group at its narrowest width, not the plan for the narrowest latency: a
    # table is measured, and where a narrower block timed slower (noise, or int8 kernels' own steps)
    # that plan may keep more MACs than the budget.
    return _largest_within(pruned, low=narrow_ms, high=full_ms, larger_at_high=True,
                           fallback=narrowest_model(model, plan_for, step=step),
                           fits=lambda m: count_macs(m, example) <= goal, iterations=iterations).eval()


def _largest_within(make: Callable[[float], nn.Module], *, low: float, high: float, larger_at_high: bool,
                    fallback: nn.Module, fits: Callable[[nn.Module], bool], iterations: int) -> nn.Module:
    """Bisect ``make``'s knob in ``[low, high]`` to the largest model that ``fits`` (``fallback`` when none does).

    ``larger_at_high``: the knob's high end makes the larger model (a latency target), or
    the smaller (a pruning ratio).
    """
    best = fallback
    for _ in range(iterations):
        middle = (low + high) / 2
        candidate = make(middle)
        within = fits(candidate)
        if within:
            best = candidate
        if within == larger_at_high:
            low = middle
        else:
            high = middle
    return best


def torchpruning_plan(model: nn.Module, example: Tensor, *, macs: float, iterations: int = 10) -> nn.Module:
    """Torch-Pruning's ``MetaPruner`` (group L2 magnitude, layer-wise, the last Linear kept) at ``macs`` of the MACs.

    Its ``pruning_ratio`` is bisected to the smallest ratio whose model has at most ``macs``
    of the dense MACs (the largest ratio tried when none does).
    """
    goal = macs * count_macs(model, example)

    def pruned(ratio: float) -> nn.Module:
        copied = copy.deepcopy(model)
        linears = [m for m in copied.modules() if isinstance(m, nn.Linear)]
        return torch_pruning_prune(copied, example, ratio=ratio, ignored=linears[-1:]).eval()

    return _largest_within(pruned, low=0.0, high=_MAX_RATIO, larger_at_high=False, fallback=pruned(_MAX_RATIO),
                           fits=lambda m: count_macs(m, example) <= goal, iterations=iterations)


def unstructured(model: nn.Module, *, macs: float) -> nn.Module:
    """``torch.nn.utils.prune.l1_unstructured`` zeroing ``1 - macs`` of every conv/linear weight (made permanent)."""
    from torch.nn.utils import prune

    copied = copy.deepcopy(model)
    for module in copied.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv1d, nn.Linear)):
            prune.l1_unstructured(module, "weight", amount=1.0 - macs)
            prune.remove(module, "weight")
    return copied.eval()


# --------------------------------------------------------------------------- int8 of the peers


def ort_default_int8(float_path: Path, calibration: Sequence[Tensor], out: Path) -> Path:
    """ONNX Runtime's ``quantize_static`` with its defaults, after its ``quant_pre_process``."""
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_suffix(".prepared.onnx")
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant_pre_process(float_path, prepared)
        quantize_static(prepared, out, BatchReader(calibration))
    return out


def _nncf_int8(float_path: Path, calibration: Sequence[Tensor], out: Path) -> Path:
    """NNCF's ``nncf.quantize`` defaults on the OpenVINO model of ``float_path``, saved as ``out`` (.xml + .bin)."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(float_path))
    data = nncf.Dataset([np.ascontiguousarray(x.numpy()) for x in calibration])
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = nncf.quantize(model, data, subset_size=len(calibration))
    ov.save_model(quantized, str(out))
    return out


# --------------------------------------------------------------------------- building and timing


def _spiralkit_int8(model: nn.Module, x: Tensor, calibration: list[Tensor], workdir: Path, threads: int) -> QuantizedModel:
    """spiralkit's static int8 (its defaults) of ``model``, calibrated on ``calibration``."""
    return quantize(model, StaticInt8(calibration_batches=len(calibration)), [(c, c) for c in calibration],
                    example=x, workdir=workdir, threads=threads)


def _file_size(*paths: Path) -> int:
    return sum(path.stat().st_size for path in paths)


def _build(model: nn.Module, x: Tensor, calibration: list[Tensor], config: PeersConfig, workdir: Path,
           plan: PlanFn) -> list[_Built]:
    """Every method, compiled and ready to time."""
    threads, budget = config.threads, config.macs
    eager, ort = runtime("eager"), runtime("ort")
    dense_macs = count_macs(model, x)
    (workdir / "eager").mkdir(parents=True, exist_ok=True)
    save_weights(model, workdir / "eager" / "weights.safetensors")
    dense_onnx = export_onnx(model, x, workdir / "dense.onnx")
    built = [
        _Built("eager_fp32", "dense, PyTorch eager", "eager", eager.from_module(model, x, threads=threads, scratch=workdir),
               dense_macs,
               _file_size(workdir / "eager" / "weights.safetensors")),
        _Built("ort_fp32", "dense, ONNX Runtime", "ort", ort.from_onnx(dense_onnx, x, threads=threads), dense_macs,
               _file_size(dense_onnx)),
    ]
    ort_int8 = ort_default_int8(dense_onnx, calibration, workdir / "dense.ort-int8.onnx")
    dense_int8 = _spiralkit_int8(model, x, calibration, workdir / "spiralkit-dense", threads)
    built += [
        _Built("ort_int8_default", "dense, ONNX Runtime quantize_static defaults", "ort",
               ort.from_onnx(ort_int8, x, threads=threads), dense_macs, _file_size(ort_int8), twin="ort_fp32"),
        _Built("spiralkit_int8", "dense, spiralkit static int8, ONNX Runtime", "ort",
               ort.from_onnx(dense_int8.path, x, threads=threads), dense_macs, dense_int8.size_bytes, twin="ort_fp32"),
    ]
    tp_model = torchpruning_plan(model, x, macs=budget)
    tp_onnx = export_onnx(tp_model, x, workdir / "torchpruning.onnx")
    tp_int8 = ort_default_int8(tp_onnx, calibration, workdir / "torchpruning.ort-int8.onnx")
    tp_macs = count_macs(tp_model, x)
    built += [
        _Built("torchpruning_fp32", "Torch-Pruning MetaPruner, ONNX Runtime", "ort",
               ort.from_onnx(tp_onnx, x, threads=threads),
               tp_macs, _file_size(tp_onnx)),
        _Built("torchpruning_ort_int8", "Torch-Pruning MetaPruner + ONNX Runtime default int8", "ort",
               ort.from_onnx(tp_int8, x, threads=threads), tp_macs, _file_size(tp_int8), twin="torchpruning_fp32"),
    ]
    sparse = unstructured(model, macs=budget)
    built.append(_Built("torch_prune_unstructured", "torch.nn.utils.prune L1 unstructured, eager", "eager",
                        eager.from_module(sparse, x, threads=threads, scratch=workdir), count_macs(sparse, x),
                        size_on_disk(sparse, workdir / "unstructured").best_bytes, twin="eager_fp32"))
    ours = plan(model, x, macs=budget, threads=threads)
    ours_int8 = _spiralkit_int8(ours, x, calibration, workdir / "spiralkit", threads)
    ours_macs = count_macs(ours, x)
    built += [
        _Built("spiralkit_prune_fp32", f"spiralkit plan ({_name(plan)}), ONNX Runtime", "ort",
               ort.from_onnx(ours_int8.float_path, x, threads=threads), ours_macs, _file_size(ours_int8.float_path)),
        _Built("spiralkit_prune_int8", "spiralkit plan + spiralkit static int8, ONNX Runtime", "ort",
               ort.from_onnx(ours_int8.path, x, threads=threads), ours_macs, ours_int8.size_bytes,
               twin="spiralkit_prune_fp32"),
    ]
    if RUNTIMES["openvino"].missing is None:
        built += _openvino_methods(dense_onnx, dense_int8.path, ours_int8.path, x, calibration, threads, workdir,
                                   dense_macs=dense_macs, ours_macs=ours_macs)
    return built


def _name(plan: PlanFn) -> str:
    """The plan function's name (of a `functools.partial`, its function's)."""
    return getattr(plan, "__name__", None) or getattr(getattr(plan, "func", None), "__name__", "custom")


PLANS: dict[str, PlanFn] = {"uniform": spiralkit_plan, "latency": latency_plan,
                            "latency_int8": functools.partial(latency_plan, runtime="ort_int8"),
                            "latency_openvino_int8": functools.partial(latency_plan, runtime="openvino_int8")}
"""The plans ``spiral bench --peers --plan`` names: ``uniform`` (`spiralkit_plan`, the default),
``latency`` (`latency_plan`, tabled on ONNX Runtime fp32), ``latency_int8`` (the same, tabled
on the int8 kernels the ``spiralkit_prune_int8`` row runs: runtime ``ort_int8``) and
``latency_openvino_int8`` (tabled on OpenVINO's int8 kernels, which run the
``spiralkit_prune_int8_openvino`` row; needs OpenVINO)."""


def _openvino_methods(dense_onnx: Path, dense_int8: Path, ours_int8: Path, x: Tensor, calibration: list[Tensor], threads: int,
                      workdir: Path, *, dense_macs: int, ours_macs: int) -> list[_Built]:
    nncf_xml = _nncf_int8(dense_onnx, calibration, workdir / "dense.nncf-int8.xml")
    return [
        _Built("openvino_fp32", "dense, OpenVINO fp32", "openvino",
               openvino_compiled(dense_onnx, x, threads, precision="f32"), dense_macs, _file_size(dense_onnx)),
        _Built("openvino_bf16", "dense, OpenVINO bf16 (near-lossless)", "openvino_bf16",
               openvino_compiled(dense_onnx, x, threads, precision="bf16"), dense_macs, _file_size(dense_onnx),
               twin="ort_fp32"),
        _Built("openvino_nncf_int8", "dense, NNCF quantize defaults, OpenVINO default precision", "openvino",
               openvino_compiled(nncf_xml, x, threads, precision=None), dense_macs,
               _file_size(nncf_xml, nncf_xml.with_suffix(".bin")), twin="ort_fp32"),
        _Built("spiralkit_int8_openvino", "dense, spiralkit's int8 .onnx, run by OpenVINO", "openvino",
               openvino_compiled(dense_int8, x, threads, precision="f32"), dense_macs, _file_size(dense_int8),
               twin="ort_fp32"),
        _Built("spiralkit_prune_int8_openvino", "spiralkit plan + spiralkit's int8 .onnx, run by OpenVINO", "openvino",
               openvino_compiled(ours_int8, x, threads, precision="f32"), ours_macs, _file_size(ours_int8),
               twin="spiralkit_prune_fp32"),
    ]


def _cosines(built: Sequence[_Built], inputs: Sequence[Tensor]) -> dict[str, float]:
    """Each method's output cosine to its twin's, over ``inputs``."""
    runs = {b.name: b.run for b in built}

    def outputs(name: str) -> Tensor:
        return torch.cat([runs[name](x).float().reshape(1, -1) for x in inputs])

    return {b.name: compare_outputs(outputs(b.twin), outputs(b.name)).cosine for b in built if b.twin is not None}


def peers(model: nn.Module, name: str, input_shape: Sequence[int], config: PeersConfig, workdir: Path, *,
          plan: PlanFn = spiralkit_plan) -> PeersReport:
    """Build every peer method from ``model`` at ``config.macs`` of its MACs and time them, interleaved.

    Args:
        model: The dense model (not changed).
        name: How the report names it.
        input_shape: One input's shape, without the batch.
        config: Budget, batch, threads, repeats, calibration.
        workdir: Where the exported and quantized files go.
        plan: How spiralkit prunes for its rows (a latency-aware planner can be passed here).

    Returns:
        The methods measured, ``eager_fp32`` first.
    """
    generator = torch.Generator().manual_seed(config.seed)
    shape = (config.batch, *input_shape)
    x = torch.randn(shape, generator=generator)
    calibration = [torch.randn(shape, generator=generator) for _ in range(config.calibration_batches)]
    evaluation = [torch.randn(shape, generator=generator) for _ in range(_EVAL_INPUTS)]
    model = model.eval()
    with torch_threads(config.threads):
        built = _build(model, x, calibration, config, workdir, plan)
        timings = time_interleaved({b.name: (lambda run=b.run: run(x)) for b in built},
                                   warmup=config.warmup, repeats=config.repeats)
        cosines = _cosines(built, evaluation)
    reference = timings["eager_fp32"].median_ms
    methods = {
        b.name: PeerResult(name=b.name, description=b.description, runtime=b.runtime,
                           latency_ms=timings[b.name].median_ms, p10_ms=timings[b.name].p10_ms,
                           p90_ms=timings[b.name].p90_ms, macs=b.macs, size_bytes=b.size_bytes,
                           speedup_vs_eager_fp32=reference / timings[b.name].median_ms,
                           twin=b.twin, cosine_to_fp32=cosines.get(b.name))
        for b in built
    }
    calibration_note = (f"{config.calibration_batches} random normal inputs of shape {list(shape)} (seed {config.seed}); "
                        "no data set read")
    return PeersReport(model=name, input_shape=tuple(input_shape), config=config, calibration=calibration_note,
                       methods=methods)


def peers_table(report: PeersReport) -> Table:
    """The methods as a rich table."""
    config = report.config
    table = Table(title=f"{report.model}: peers at {config.macs:.0%} of the MACs, batch {config.batch}, "
                        f"{config.threads} thread(s), interleaved x{config.repeats}", caption=runtimes_caption())
    for column in ("method", "runtime", "median ms", "p10–p90 ms", "speed-up", "MMACs", "size KB", "cosine"):
        table.add_column(column, justify="left" if column in ("method", "runtime") else "right",
                         no_wrap=column in ("method", "runtime"))
    for m in report.methods.values():
        table.add_row(m.name, m.runtime, f"{m.latency_ms:.3f}", f"{m.p10_ms:.3f}–{m.p90_ms:.3f}",
                      f"{m.speedup_vs_eager_fp32:.2f}x", f"{m.macs / 1e6:,.1f}", f"{m.size_bytes / 1e3:,.0f}",
                      "" if m.cosine_to_fp32 is None else f"{m.cosine_to_fp32:.5f}")
    return table
