"""The ``spiral`` command."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from spiralkit.bench import RUNTIMES, BenchConfig, BenchResult, Candidate, bench, bench_table, input_shape_of
from spiralkit.bench import BenchError, model_candidates, run_candidates
from spiralkit.bench.peers import PLANS, PeersConfig, peers_table
from spiralkit.bench.peers import peers as run_peers
from spiralkit.errors import SpiralError
from spiralkit.parallel import launched, world_from_env
from spiralkit.report import CompareRun, Report, print_report, write_compare_html, write_html_report
from spiralkit.spiral import Spiral, build_report, load_recipe, load_run_state, parse_recipe
from spiralkit.report.analysis import ANALYSIS_HTML, ANALYSIS_JSON
from spiralkit.spiral.analyze import SCANS, AnalyzeConfig, analyze, scans_only
from spiralkit.spiral.analyze import suggest as suggest_fragment
from spiralkit.spiral.compare import CompareConfig, compare
from spiralkit.spiral.export import export_run
from spiralkit.spiral.fingerprint import Fingerprint, fingerprint, run_fingerprint
from spiralkit.spiral.rundir import MODEL, RECIPE, REPORT_HTML, REPORT_JSON, STATE, load_curves

app = typer.Typer(
    name="spiral",
    help="Make trained PyTorch models smaller and faster: prune, distil, quantize.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(exc: SpiralError) -> typer.Exit:
    # escaped: messages may hold brackets ("pip install 'spiralkit[openvino]'") that are not markup
    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def _one_process(command: str) -> None:
    """Refuse to run ``command`` under torchrun: each process would run all of it, writing the same files."""
    if world_from_env(os.environ).parallel:
        raise SpiralError(f"spiral {command} runs in one process: launch it without torchrun "
                          "(`spiral run` and `spiral demo` run data-parallel)")


def _interrupted(run_dir: Path) -> typer.Exit:
    """Ctrl-C: every step so far is saved; say how to go on. Exit status 130, as for SIGINT."""
    Console(stderr=True).print(f"interrupted: the run is saved up to its last finished step; continue it with "
                               f"`spiral run --resume {run_dir}`", highlight=False, soft_wrap=True)
    return typer.Exit(code=130)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/demo"),
    fresh: Annotated[bool, typer.Option(help="Delete an earlier demo run in OUT first.")] = False,
) -> None:
    """Run the whole product on bundled data: structured and unstructured rounds with distillation, then int8."""
    text = resources.files("spiralkit").joinpath("demo.yaml").read_text(encoding="utf-8")
    try:
        recipe = parse_recipe(text, source="spiralkit/demo.yaml")
        if fresh and out.exists():
            shutil.rmtree(out)
        earlier = run_fingerprint(out)
        if earlier is not None and earlier.differences(fingerprint(recipe)):
            raise SpiralError(f"{out} holds a run of another demo recipe (an earlier spiralkit's): "
                              "start over with `spiral demo --fresh`")
        with launched() as world:
            resume = (out / STATE).exists()
            Spiral(recipe).run(out, resume=resume, world=world)
    except SpiralError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        raise _interrupted(out) from None
    Console().print(f"the report with its plots: {out / REPORT_HTML}", highlight=False, soft_wrap=True)


@app.command()
def run(
    recipe: Annotated[Optional[Path], typer.Argument(help="Recipe YAML file.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run directory (default: runs/<recipe name>).")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the killed run in this directory (with RECIPE: only if it is the recipe that started it).")] = None,
    allow_code: Annotated[bool, typer.Option("--allow-code", help="Let the recipe name code to import and run (model or data 'package.module:function'). Only for recipes you trust.")] = False,
) -> None:
    """Run a recipe, or resume a run that was interrupted.

    Under `torchrun --nproc-per-node N` the recipe runs data-parallel in N processes (see the README).
    """
    run_dir = resume
    try:
        if resume is not None:  # with a RECIPE too, it must be the recipe that started the run
            loaded = load_recipe(recipe if recipe is not None else resume / RECIPE)
            with launched() as world:
                Spiral(loaded, allow_code=allow_code).run(resume, resume=True, world=world)
            return
        if recipe is None:
            raise SpiralError("give a RECIPE file, or --resume RUN_DIR")
        loaded = load_recipe(recipe)
        run_dir = out or Path("runs") / loaded.name
        with launched() as world:
            Spiral(loaded, allow_code=allow_code).run(run_dir, world=world)
    except SpiralError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        if run_dir is None:
            raise typer.Exit(code=130) from None
        raise _interrupted(run_dir) from None


@app.command("compare")
def compare_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    seeds: Annotated[int, typer.Option(help="Seeds per method (recipe seed, +1, ...).")] = 3,
    out: Annotated[Optional[Path], typer.Option(help="Comparison directory (default: runs/compare/<recipe name>); run it again to resume.")] = None,
    allow_code: Annotated[bool, typer.Option("--allow-code", help="Let the recipe name code to import and run (model or data 'package.module:function'). Only for recipes you trust.")] = False,
) -> None:
    """Compare the spiral with one-shot pruning + fine-tuning or distillation, at the same recovery epochs."""
    try:
        _one_process("compare")
        config = CompareConfig(seeds=seeds, allow_code=allow_code)
        loaded = load_recipe(recipe)
        compare(loaded, out or Path("runs") / "compare" / loaded.name, config)
    except SpiralError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted: finished steps are saved; run the same command again to resume",
                                   highlight=False, soft_wrap=True)
        raise typer.Exit(code=130) from None


@app.command("analyze")
def analyze_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    out: Annotated[Path, typer.Option(help="Where analysis.json and analysis.html go (and the trained baseline, reused next time).")],
    limit: Annotated[Optional[int], typer.Option(help="Measure on the first N examples of the split (default: all).")] = None,
    scan: Annotated[Optional[list[str]], typer.Option(help=f"Scan only this (repeat for more): {', '.join(SCANS)} (default: all).")] = None,
    split: Annotated[str, typer.Option(help="The split measured on: val (carved from the training data, as a run decides) or test (held out, e.g. SST-2's dev sentences).")] = "val",
    from_run: Annotated[Optional[Path], typer.Option("--from", help="Analyse this run directory's baseline.safetensors instead of training one.")] = None,
    suggest: Annotated[bool, typer.Option("--suggest", help="Print a recipe fragment: layers to keep unpruned, bits per layer.")] = False,
    max_drop: Annotated[Optional[float], typer.Option(help="The drop --suggest tolerates (default: the recipe's targets.max_metric_drop).")] = None,
    allow_code: Annotated[bool, typer.Option("--allow-code", help="Let the recipe name code to import and run (model or data 'package.module:function'). Only for recipes you trust.")] = False,
) -> None:
    """Scan how much each layer's pruning or quantization alone costs, without recovery."""
    try:
        _one_process("analyze")
        config = AnalyzeConfig(limit=limit, from_run=from_run, split=split, allow_code=allow_code)  # type: ignore[arg-type]
        if scan:
            config = scans_only(config, scan)
        loaded = load_recipe(recipe)
        result = analyze(loaded, out, config)
        Console(stderr=True).print(f"wrote {out / ANALYSIS_JSON} and {out / ANALYSIS_HTML}", highlight=False, soft_wrap=True)
        if suggest:
            typer.echo(suggest_fragment(result, loaded, max_drop=max_drop), nl=False)
    except SpiralError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        raise typer.Exit(code=130) from None


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="A run directory, or several to compare.", show_default=False)],
    html: Annotated[bool, typer.Option("--html", help="Write report.html (one run) or compare.html (several runs, into --out).")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Where --html writes: default the run directory; required with several runs.")] = None,
) -> None:
    """Print the report of a run (finished or not); with --html, write it as a web page, or compare runs."""
    try:
        if out is not None and not html:
            raise SpiralError("--out goes with --html: it is where the HTML page is written")
        if not html:
            for run_dir in run_dirs:
                print_report(_load_report(run_dir))
            return
        if len(run_dirs) == 1:
            written = _write_run_html(run_dirs[0], out or run_dirs[0])
        elif out is None:
            raise SpiralError("comparing several runs writes compare.html: give its directory with --out OUT_DIR")
        else:
            written = write_compare_html(_compare_runs(run_dirs), out)
    except SpiralError as exc:
        raise _fail(exc) from None
    Console().print(f"wrote {written}", highlight=False, soft_wrap=True)


def _load_report(run_dir: Path) -> Report:
    """The run's report.json, else the report of its state (an unfinished run)."""
    path = run_dir / REPORT_JSON
    if path.exists():
        return _read_report(path)
    if (run_dir / RECIPE).exists():
        return build_report(load_recipe(run_dir / RECIPE), load_run_state(run_dir))
    raise SpiralError(f"{run_dir} is not a run directory: it has no report.json or recipe.yaml")


def _read_report(path: Path) -> Report:
    try:
        return Report.from_json(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # pydantic's ValidationError and UnicodeDecodeError are ValueErrors
        raise SpiralError(f"{path} is not a readable spiralkit report: {str(exc).splitlines()[0]}") from None


def _recipe_text(run_dir: Path) -> str | None:
    path = run_dir / RECIPE
    try:
        return path.read_text(encoding="utf-8") if path.exists() else None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpiralError(f"cannot read {path}: {exc}") from None


def _write_run_html(run_dir: Path, out: Path) -> Path:
    report_ = _load_report(run_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpiralError(f"cannot create {out}: {exc.strerror or exc}") from None
    return write_html_report(report_, out, recipe_text=_recipe_text(run_dir), weights=run_dir / MODEL,
                             curves=load_curves(run_dir))


def _compare_runs(run_dirs: list[Path]) -> list[CompareRun]:
    """The runs to compare, each with its recipe's differences from the first run's."""
    first = run_fingerprint(run_dirs[0])
    names = _run_names(run_dirs)
    runs = [CompareRun(name=names[0], report=_load_report(run_dirs[0]), recipe_changes=[])]
    for run_dir, name in zip(run_dirs[1:], names[1:]):
        these = run_fingerprint(run_dir)
        changes = None if first is None or these is None else [
            (key, _keyed(first, key), _keyed(these, key)) for key in first.differences(these)
        ]
        runs.append(CompareRun(name=name, report=_load_report(run_dir), recipe_changes=changes))
    return runs


def _run_names(run_dirs: list[Path]) -> list[str]:
    """The runs' paths relative to their common parent: short enough to label plot points, still distinct."""
    resolved = [path.resolve() for path in run_dirs]
    common = Path(os.path.commonpath(resolved)) if len(resolved) > 1 else resolved[0].parent
    return [str(path.relative_to(common)) if path != common else path.name for path in resolved]


def _keyed(print_: Fingerprint, key: str) -> object:
    """A differing key's value: the recipe's value, or the start of a file's SHA-256 (``KEY (file contents)``)."""
    if key in print_.keys:
        return print_.keys[key]
    digest = print_.files.get(key.removesuffix(" (file contents)"))
    return None if digest is None else f"sha256 {digest[:12]}…"


class ExportFormat(str, Enum):
    """Formats ``spiral export`` writes."""

    ONNX = "onnx"


@app.command("export")
def export_command(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    fmt: Annotated[ExportFormat, typer.Option("--format", help="Output format.")] = ExportFormat.ONNX,
    allow_code: Annotated[bool, typer.Option("--allow-code", help="Let the run's recipe name code to import and run. Only for run directories you trust.")] = False,
) -> None:
    """Export a run's compressed model (ONNX, checked against ONNX Runtime)."""
    try:
        exported = export_run(run_dir, allow_code=allow_code)
    except SpiralError as exc:
        raise _fail(exc) from None
    check = exported.check
    Console().print(f"wrote {exported.path}: {exported.note}; ONNX Runtime agrees (max |diff| "
                    f"{check.max_abs_diff:.2e}, cosine {check.cosine:.6f})", highlight=False, soft_wrap=True)


def _split(values: list[str]) -> list[str]:
    """Repeated options and comma-separated lists alike: ``["eager,ort", "openvino"]`` → three values."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _ints(values: list[str], option: str) -> tuple[int, ...]:
    try:
        return tuple(int(value) for value in _split(values))
    except ValueError:
        raise SpiralError(f"{option} takes whole numbers (comma-separated or repeated), got {' '.join(values)!r}") from None


def _bench_target(target: str, checkpoint: Optional[Path], input_shape: tuple[int, ...],
                  allow_code: bool) -> tuple[list[Candidate], tuple[int, ...]]:
    """A run directory's models (TARGET is a directory or a path), else the model TARGET names."""
    path = Path(target)
    if path.is_dir() or os.sep in target:
        if not path.is_dir():
            raise SpiralError(f"{target} is not a run directory: no such directory")
        if checkpoint is not None:
            raise SpiralError("--checkpoint goes with a MODEL, not with a run directory (which has its own weights)")
        candidates, shape = run_candidates(path, allow_code=allow_code)
        return candidates, input_shape or shape
    return model_candidates(target, checkpoint), input_shape_of(target, input_shape)


@app.command("bench")
def bench_command(
    target: Annotated[str, typer.Argument(help="A run directory (its baseline, pruned and final models), or a MODEL as recipes name it: lenet5, cifar_resnet20, torchvision:resnet18.")],
    peers: Annotated[bool, typer.Option("--peers", help="Compare spiralkit with ONNX Runtime, Torch-Pruning, torch.nn.utils.prune and OpenVINO + NNCF on TARGET at the --macs budget (batch and threads: the first given).")] = False,
    runtimes: Annotated[list[str], typer.Option("--runtime", help=f"Runtimes, repeated or comma-separated: {', '.join(RUNTIMES)}.")] = ["eager", "ort"],  # noqa: B006 (typer reads, never mutates)
    batch: Annotated[list[str], typer.Option(help="Batch sizes, repeated or comma-separated.")] = ["1"],  # noqa: B006
    threads: Annotated[list[str], typer.Option(help="Intra-op thread counts, repeated or comma-separated.")] = ["1"],  # noqa: B006
    checkpoint: Annotated[Optional[Path], typer.Option(help="Weights for MODEL (.safetensors or a weights-only torch file); default: its initial weights.")] = None,
    input_shape: Annotated[Optional[str], typer.Option(help="One input's shape without the batch, e.g. 3,224,224 (default: known per model, or the run's data).")] = None,
    macs: Annotated[float, typer.Option(help="With --peers: the fraction of the dense MACs the pruned methods keep.")] = 0.5,
    plan: Annotated[str, typer.Option(help=f"With --peers: how spiralkit prunes: {', '.join(PLANS)} (uniform L2 widths, multiples of 16; or the latency-aware planner on ONNX Runtime's fp32 or int8 table).")] = "uniform",
    repeats: Annotated[int, typer.Option(help="Timed rounds (each calls every candidate once, round-robin).")] = 30,
    warmup: Annotated[int, typer.Option(help="Untimed rounds first.")] = 5,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the results here as JSON.")] = None,
    workdir: Annotated[Optional[Path], typer.Option(help="Keep the exported .onnx files here (default: a temporary directory).")] = None,
    allow_code: Annotated[bool, typer.Option("--allow-code", help="Let a run directory's recipe name code to import and run. Only for run directories you trust.")] = False,
) -> None:
    """Time models on chosen runtimes, batches and threads, interleaved; with --peers, against the other tools."""
    try:
        batches, thread_counts = _ints(batch, "--batch"), _ints(threads, "--threads")
        # Configs first: a bad runtime or budget fails before any model is built.
        grid = None if peers else BenchConfig(runtimes=tuple(_split(runtimes)), batches=batches, threads=thread_counts,
                                              warmup=warmup, repeats=repeats)
        budget = PeersConfig(macs=macs, batch=batches[0], threads=thread_counts[0], warmup=warmup,
                             repeats=repeats) if peers else None
        if plan not in PLANS:
            raise BenchError(f"unknown --plan {plan!r}; known plans: {', '.join(PLANS)}")
        shape = _ints([input_shape], "--input-shape") if input_shape else ()
        candidates, shape = _bench_target(target, checkpoint, shape, allow_code)
        with tempfile.TemporaryDirectory(prefix="spiral-bench-") as tmp:
            where = workdir or Path(tmp)
            if budget is not None:
                model = candidates[0].module
                assert model is not None  # the first candidate is always a module (a model, a run's baseline)
                measured = run_peers(model, target, shape, budget, where, plan=PLANS[plan])
                table, data = peers_table(measured), measured.to_dict()
            else:
                assert grid is not None
                rows = bench(candidates, shape, grid, where)
                table = bench_table(rows, title=f"{target}: interleaved x{repeats}, median and p10–p90")
                data = BenchResult(target=target, input_shape=shape, config=grid, rows=rows).to_dict()
        console = Console()
        # Piped or captured output gets the whole table; a terminal keeps its own width.
        (console if console.is_terminal else Console(width=132)).print(table)
        if json_out is not None:
            _write_json(json_out, data)
    except SpiralError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        raise typer.Exit(code=130) from None


def _write_json(path: Path, data: object) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise SpiralError(f"cannot write {path}: {exc.strerror or exc}") from None
    Console(stderr=True).print(f"wrote {path}", highlight=False, soft_wrap=True)


def main() -> None:
    """Entry point of the ``spiral`` console script."""
    app()
