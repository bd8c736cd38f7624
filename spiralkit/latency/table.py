"""Latency tables: each prunable block's measured latency over a grid of input/output widths.

A *block* is one convolution or linear layer of a model with the batch norm and activation
that usually follow it — the unit whose widths a latency-constrained plan chooses. Its
`BlockShape` is everything but the widths that decides its cost (kind, kernel, stride,
padding, dilation, groups, input spatial size, bias); a `LatencyTable` holds, for each shape,
the median milliseconds of the block at every ``(in, out)`` width pair of a coarse grid
(multiples of ``step`` plus the full width, see `width_grid`).

Tables are cached as JSON, one file per *environment* (`TableEnv`: runtime and its version,
threads, batch size and the CPU's instruction set), under ``$SPIRALKIT_CACHE_DIR/latency`` or
``~/.cache/spiralkit/latency``. A build times only the entries its file lacks, so rounds and
runs reuse one another's timings; a change of any environment part is another file.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from spiralkit.cpu import cpu_flags
from spiralkit.data.arraycache import cache_dir
from spiralkit.export.weights import atomic_write_text
from spiralkit.graph.layers import is_depthwise
from spiralkit.latency.runtimes import LatencyError, get_runtime, interleaved_ms
from spiralkit.measure import Clock

__all__ = [
    "Block",
    "BlockShape",
    "LatencyTable",
    "TableEnv",
    "build_table",
    "cpu_signature",
    "table_blocks",
    "table_env",
    "time_entries",
    "width_grid",
]

_FORMAT = 1
_CONV_KINDS = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d"}
_BN = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}
_CLASSES = {kind: cls for cls, kind in _CONV_KINDS.items()}


@dataclass(frozen=True)
class BlockShape:
    """What decides a block's cost besides its widths.

    Attributes:
        kind: ``conv1d``, ``conv2d``, ``conv3d`` or ``linear``.
        spatial: the input's size after the channel axis (conv), or between batch and
            features (linear).
        kernel, stride, padding, dilation: the convolution's (empty for linear).
        groups: ``0`` for a depthwise convolution (as many groups as channels, so in = out),
            else the number of groups.
        bias: the layer has a bias.
    """

    kind: str
    spatial: tuple[int, ...]
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = False

    @property
    def depthwise(self) -> bool:
        """One group per channel: the block's input width is its output width."""
        return self.groups == 0

    def key(self) -> str:
        """The shape as a string key of the table's JSON."""
        return json.dumps([self.kind, self.spatial, self.kernel, self.stride, self.padding, self.dilation,
                           self.groups, self.bias], separators=(",", ":"))

    def module(self, in_width: int, out_width: int) -> nn.Module:
        """The block at these widths: conv + batch norm + ReLU, or a linear layer."""
        if self.kind == "linear":
            return nn.Linear(in_width, out_width, bias=self.bias)
        conv = _CLASSES[self.kind]
        groups = out_width if self.depthwise else self.groups
        return nn.Sequential(
            conv(in_width, out_width, self.kernel, stride=self.stride, padding=self.padding,  # type: ignore[arg-type]
                 dilation=self.dilation, groups=groups, bias=self.bias),
            _BN[conv](out_width), nn.ReLU(),
        )

    def example(self, batch: int, in_width: int) -> Tensor:
        """A random input batch of the block at input width ``in_width`` (fixed seed)."""
        size = (batch, in_width, *self.spatial) if self.kind != "linear" else (batch, *self.spatial, in_width)
        return torch.randn(size, generator=torch.Generator().manual_seed(0))


@dataclass(frozen=True)
class Block:
    """One prunable block of a model: a conv or linear layer, its shape and full widths."""

    name: str
    shape: BlockShape
    in_size: int
    out_size: int


def _shape_of(module: nn.Module, x: Tensor) -> BlockShape:
    if isinstance(module, nn.Linear):
        return BlockShape(kind="linear", spatial=tuple(x.shape[1:-1]), bias=module.bias is not None)
    assert isinstance(module, nn.modules.conv._ConvNd)
    return BlockShape(
        kind=_CONV_KINDS[type(module)], spatial=tuple(x.shape[2:]), kernel=tuple(module.kernel_size),
        stride=tuple(module.stride),
        padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
        dilation=tuple(module.dilation), groups=0 if is_depthwise(module) else module.groups,
        bias=module.bias is not None,
    )


def table_blocks(model: nn.Module, example: Tensor) -> list[Block]:
    """The conv (1-3d) and linear layers ``model(example)`` runs, with the input shapes they see.

    A layer called more than once keeps its first call's shape; layers not called are left out.
    """
    seen: dict[str, Block] = {}
    hooks = []
    for name, module in model.named_modules():
        if type(module) in _CONV_KINDS or isinstance(module, nn.Linear):
            def hook(mod: nn.Module, args: tuple[Tensor, ...], _: object, name: str = name) -> None:
                if name not in seen:
                    sizes = (mod.in_channels, mod.out_channels) if not isinstance(mod, nn.Linear) else (
                        mod.in_features, mod.out_features)
                    seen[name] = Block(name=name, shape=_shape_of(mod, args[0]), in_size=sizes[0], out_size=sizes[1])
            hooks.append(module.register_forward_hook(hook))
    try:
        training = model.training
        model.eval()
        with torch.no_grad():
            model(example)
        model.train(training)
    finally:
        for handle in hooks:
            handle.remove()
    return list(seen.values())


def width_grid(size: int, step: int) -> tuple[int, ...]:
    """The widths a table measures for a side of ``size``: multiples of ``step`` up to ``size``, and ``size``.

    E.g. ``width_grid(20, 8) == (8, 16, 20)``.
    """
    return tuple(sorted({*range(step, size + 1, step), size}))


def cpu_signature() -> str:
    """A short hash of the CPU's instruction set (``flags`` of ``/proc/cpuinfo``; else ``platform.processor()``)."""
    source = " ".join(sorted(cpu_flags())) or f"{platform.machine()} {platform.processor()}"
    return hashlib.sha256(source.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TableEnv:
    """Where a table's timings hold: runtime and version, threads, batch size, CPU instruction set, clock."""

    runtime: str
    runtime_version: str
    threads: int
    batch: int
    cpu: str
    clock: Clock = "wall"

    def digest(self) -> str:
        """A short hash of the environment: the cache file's name."""
        text = json.dumps([_FORMAT, self.runtime, self.runtime_version, self.threads, self.batch, self.cpu, self.clock])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def table_env(*, runtime: str, threads: int, batch: int, clock: Clock = "wall") -> TableEnv:
    """The environment of a table measured here and now.

    Raises:
        LatencyError: ``runtime`` is unknown.
    """
    return TableEnv(runtime=runtime, runtime_version=get_runtime(runtime).version(), threads=threads, batch=batch,
                    cpu=cpu_signature(), clock=clock)


@dataclass
class LatencyTable:
    """Measured block latencies (ms) by block shape and ``(in, out)`` widths, in one environment.

    Attributes:
        env: where the timings hold.
        entries: shape key → ``(in, out)`` → median milliseconds.
        timed: how many entries this build measured (0 when all came from the cache).
    """

    env: TableEnv
    entries: dict[str, dict[tuple[int, int], float]] = field(default_factory=dict)
    timed: int = 0

    def ms(self, shape: BlockShape, in_width: int, out_width: int) -> float:
        """The block's latency at these widths.

        Widths off the grid take the entry of the nearest widths at least as large (an
        upper bound: a block is not slower with fewer channels in the grid's terms).

        Raises:
            LatencyError: The table has no entry covering the widths.
        """
        row = self.entries.get(shape.key(), {})
        if (in_width, out_width) in row:
            return row[(in_width, out_width)]
        above = [(i, o) for i, o in row if i >= in_width and o >= out_width]
        if not above:
            raise LatencyError(f"the latency table has no entry for {shape.kind} {shape.key()} at widths "
                               f"({in_width}, {out_width}); build it for these widths")
        return row[min(above, key=lambda io: (io[0] * io[1], io))]

    def to_json(self) -> str:
        """The table as JSON (entries keyed ``"in,out"``)."""
        return json.dumps({
            "format": _FORMAT, **vars(self.env),
            "entries": {key: {f"{i},{o}": ms for (i, o), ms in sorted(row.items())} for key, row in sorted(self.entries.items())},
        }, indent=1)

    @classmethod
    def from_json(cls, text: str, env: TableEnv) -> LatencyTable:
        """The entries of a table file written by `to_json` for ``env``; empty when the file is for another."""
        raw = json.loads(text)
        written = {name: raw.get(name) for name in vars(env)}
        if raw.get("format") != _FORMAT or written != vars(env):
            return cls(env=env)
        return cls(env=env, entries={key: {(int(k.split(",")[0]), int(k.split(",")[1])): float(v) for k, v in row.items()}
                                     for key, row in raw["entries"].items()})


def _cache_file(directory: Path | None, env: TableEnv) -> Path:
    return cache_dir(directory) / "latency" / f"{env.runtime}-{env.digest()}.json"


def _load(path: Path, env: TableEnv) -> LatencyTable:
    try:
        return LatencyTable.from_json(path.read_text(encoding="utf-8"), env)
    except (OSError, ValueError, KeyError, AttributeError):
        return LatencyTable(env=env)  # missing or unreadable: measure again


def time_entries(
    entries: Sequence[tuple[BlockShape, tuple[int, int]]], *, env: TableEnv, warmup: int, repeats: int, passes: int
) -> list[float]:
    """Milliseconds of each block shape at its ``(in, out)`` widths, on ``env``'s runtime, threads, batch and clock.

    Timed by `spiralkit.latency.runtimes.interleaved_ms`: the lowest of ``passes`` medians,
    the entries taken in turn, so that a burst of load on a shared machine does not stick
    to one entry.
    """
    runs = []
    for index, (shape, (in_width, out_width)) in enumerate(entries):
        with torch.random.fork_rng():
            torch.manual_seed(index)
            runs.append((shape.module(in_width, out_width).eval(), shape.example(env.batch, in_width)))
    return interleaved_ms(runs, runtime=env.runtime, threads=env.threads, warmup=warmup, repeats=repeats,
                          passes=passes, clock=env.clock)


def _pairs(block: Block, widths: tuple[Sequence[int], Sequence[int]]) -> list[tuple[int, int]]:
    ins, outs = widths
    if block.shape.depthwise:
        return [(w, w) for w in outs]
    return [(i, o) for i in ins for o in outs]


def build_table(
    model: nn.Module,
    example: Tensor,
    *,
    runtime: str = "ort",
    threads: int = 1,
    step: int = 8,
    widths: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None,
    directory: Path | None = None,
    cache: bool = True,
    warmup: int = 2,
    repeats: int = 5,
    passes: int = 3,
    clock: Clock = "wall",
) -> LatencyTable:
    """Measure (or read from the cache) the latency table of ``model``'s blocks.

    Args:
        model: The model; its conv and linear layers are the blocks (see `table_blocks`).
        example: An input batch: its batch size is the table's.
        runtime: A name in `spiralkit.latency.runtimes.RUNTIMES`.
        threads: Intra-op threads of the runtime.
        step: The width grid's step (see `width_grid`).
        widths: For some blocks (by layer name), the ``(input, output)`` widths to measure
            instead of both sides' grids — e.g. only the full width of a side no plan changes.
        directory: The cache directory (default ``$SPIRALKIT_CACHE_DIR`` or ``~/.cache/spiralkit``).
        cache: Read and write the cache file (off: measure everything, write nothing).
        warmup: Untimed runs of each entry in each pass.
        repeats: Timed runs of each entry in each pass (their median is the pass's timing).
        passes: Passes over all entries; an entry keeps its lowest median (see `time_entries`).
        clock: ``wall`` or ``cpu`` time (see `spiralkit.measure.measure_call`).

    Returns:
        The table, holding every entry the blocks need (and whatever else the cache held).

    Raises:
        LatencyError: ``runtime`` is unknown.
    """
    env = table_env(runtime=runtime, threads=threads, batch=int(example.shape[0]), clock=clock)
    path = _cache_file(directory, env)
    table = _load(path, env) if cache else LatencyTable(env=env)
    widths = widths or {}
    missing: dict[tuple[str, tuple[int, int]], BlockShape] = {}
    for block in table_blocks(model, example):
        sides = widths.get(block.name, (width_grid(block.in_size, step), width_grid(block.out_size, step)))
        row = table.entries.get(block.shape.key(), {})
        missing |= {(block.shape.key(), pair): block.shape for pair in _pairs(block, sides) if pair not in row}
    entries = [(shape, pair) for (_, pair), shape in missing.items()]
    timings = time_entries(entries, env=env, warmup=warmup, repeats=repeats, passes=passes) if entries else []
    for (shape, pair), ms in zip(entries, timings):
        table.entries.setdefault(shape.key(), {})[pair] = ms
    table.timed = len(entries)
    if cache and table.timed:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, table.to_json())
    return table
