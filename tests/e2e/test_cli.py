"""The `spiral` command: in-process for the quick paths, real processes for demo and SIGKILL/resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spiralkit.cli import app

TINY = """\
name: tiny
seed: 3
threads: 1
model: {name: mlp, kwargs: {in_features: 64, widths: [64]}}
data: {name: digits, batch_size: 32, val_fraction: 0.2}
train: {epochs: 6, optimizer: {name: adam, lr: 0.01}}
prune: {target_sparsity: 0.8, schedule: {kind: agp, rounds: 3}}
recover: {kind: distill, train: {epochs: EPOCHS, optimizer: {name: sgd, lr: 0.02}}}
targets: {max_metric_drop: 3.0, min_step: 0.05, max_rounds: 6}
measure: {repeats: 3, warmup: 1}
"""


def tiny_recipe(tmp_path: Path, *, epochs: int = 2) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.replace("EPOCHS", str(epochs)))
    return path


@pytest.mark.parametrize("command", [[], ["demo"], ["run"], ["report"], ["export"]])
def test_help(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_run_then_report(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(tiny_recipe(tmp_path)), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "spiralkit — tiny" in result.output and "final" in result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["final"]["sparsity"] > 0.7
    again = runner.invoke(app, ["report", str(tmp_path / "run")])
    assert again.exit_code == 0 and "final" in again.output


def test_export_onnx_verified(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["run", str(tiny_recipe(tmp_path)), "--out", str(tmp_path / "run")]).exit_code == 0
    result = runner.invoke(app, ["export", str(tmp_path / "run"), "--format", "onnx"])
    assert result.exit_code == 0, result.output
    assert "the pruned model, checked against PyTorch; ONNX Runtime agrees" in " ".join(result.output.split())
    assert (tmp_path / "run" / "model.onnx").stat().st_size > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "missing.yaml"], "recipe file not found: missing.yaml"),
        (["run"], "give a RECIPE file, or --resume RUN_DIR"),
        (["report", "nowhere"], "nowhere is not a run directory"),
        (["run", "--resume", "nowhere"], "recipe file not found: nowhere/recipe.yaml"),
        (["export", "nowhere"], "nowhere is not a run directory: it holds no recipe.yaml"),
    ],
)
def test_errors_are_one_clear_line(args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_recipe_typo_names_key_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(TINY.replace("EPOCHS", "1").replace("max_rounds", "max_round"))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert "line 9: unknown key 'targets.max_round' (did you mean 'max_rounds'?)" in " ".join(result.output.split())


def _default_sigint() -> None:
    # A child inherits an ignored SIGINT, and Python then raises no KeyboardInterrupt (the
    # interrupted run went on to finish, exit 0). No test was found that ignores SIGINT (no
    # signal handling in spiralkit, tests or bench; importing torch, onnxruntime, openvino,
    # nncf, transformers, torch_pruning, matplotlib, or an ONNX export, leaves the default
    # handler). What does it: a pytest started in the background by a non-interactive shell
    # (`pytest ... &` in a script, `nohup`) starts with SIGINT ignored, as POSIX shells do for
    # background jobs without job control, and Python keeps an inherited SIG_IGN
    # (`bash -c 'python -c "import signal; print(signal.getsignal(2))" & wait'` prints
    # 1, SIG_IGN). The command is tested as a terminal starts it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spiral(*args: str, cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "spiralkit", *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        preexec_fn=_default_sigint,
    )


def _rounds(run_dir: Path) -> int:
    try:
        return len(json.loads((run_dir / "state.json").read_text())["rounds"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.mark.slow
def test_sigkill_mid_round_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path, epochs=40)
    reference = _spiral("run", str(recipe), "--out", str(tmp_path / "ref"), cwd=tmp_path)
    assert reference.wait(timeout=600) == 0, reference.stderr.read().decode() if reference.stderr else ""

    victim = _spiral("run", str(recipe), "--out", str(tmp_path / "run"), cwd=tmp_path)
    deadline = time.monotonic() + 300
    while _rounds(tmp_path / "run") < 1 and time.monotonic() < deadline and victim.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # well inside round 2's recovery
    assert victim.poll() is None, "the run ended before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["final"] is None and len(state["rounds"]) >= 1

    resumed = _spiral("run", "--resume", str(tmp_path / "run"), cwd=tmp_path)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode() if resumed.stderr else ""
    ref = json.loads((tmp_path / "ref" / "report.json").read_text())
    got = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [r["accepted"] for r in got["rounds"]] == [r["accepted"] for r in ref["rounds"]]
    assert abs(got["final"]["metric"] - ref["final"]["metric"]) <= 0.1
    assert got["final"]["nonzero_params"] == ref["final"]["nonzero_params"]


@pytest.mark.slow
def test_demo_meets_its_promise(tmp_path: Path) -> None:
    """The README's demo: structured and unstructured rounds and int8 together, accuracy within 0.5 points."""
    result = subprocess.run(
        [sys.executable, "-m", "spiralkit", "demo", "--out", str(tmp_path / "demo")],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    stages = {r["progress"] for r in report["rounds"] if r["accepted"]}
    assert stages == {"macs reduction", "sparsity"}, "both kinds of rounds were kept"
    assert report["final"]["macs"] <= 0.45 * report["baseline"]["macs"], "channels physically removed"
    assert report["baseline"]["nonzero_params"] / report["final"]["nonzero_params"] >= 10
    assert report["quantization"]["kind"] == "static-int8"
    assert report["final"]["metric"] >= report["baseline"]["metric"] - 0.5
    output = " ".join(result.stdout.split())
    assert "x faster (measured)" in output and f"the report with its plots: {tmp_path / 'demo' / 'report.html'}" in output
    assert (tmp_path / "demo" / "report.html").exists()


def test_a_recipe_naming_code_exits_before_importing_anything(tmp_path: Path) -> None:
    """The command contract: without --allow-code, `package.module:function` exits non-zero, importing nothing."""
    marker = tmp_path / "imported"
    module = tmp_path / "evil_module.py"
    module.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\ndef build():\n    raise SystemExit\n")
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(TINY.replace("EPOCHS", "1").replace("model: {name: mlp, kwargs: {in_features: 64, widths: [64]}}",
                                                          "model: {name: 'evil_module:build'}"))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "spiralkit", "run", str(recipe), "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert "names Python code" in result.stderr and "--allow-code" in " ".join(result.stderr.split())
    assert not marker.exists(), "the module was imported"


@pytest.mark.slow
def test_ctrl_c_exits_130_saying_how_to_resume_and_the_resume_finishes(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path, epochs=40)
    victim = _spiral("run", str(recipe), "--out", str(tmp_path / "run"), cwd=tmp_path)
    deadline = time.monotonic() + 300
    while _rounds(tmp_path / "run") < 1 and time.monotonic() < deadline and victim.poll() is None:
        time.sleep(0.05)
    assert victim.poll() is None, "the run ended before it could be interrupted"
    rounds_before = _rounds(tmp_path / "run")
    victim.send_signal(signal.SIGINT)
    code = victim.wait(timeout=120)
    stderr = victim.stderr.read().decode() if victim.stderr else ""
    # what the run did, should it not stop (seen once under a full suite on a loaded machine)
    assert code == 130, (f"exit {code}; rounds at the signal {rounds_before}, after {_rounds(tmp_path / 'run')}; "
                         f"stderr ends: {stderr[-1500:]}")
    message = " ".join(stderr.split())
    assert f"interrupted: the run is saved up to its last finished step; continue it with `spiral run --resume {tmp_path / 'run'}`" in message
    resumed = _spiral("run", "--resume", str(tmp_path / "run"), cwd=tmp_path)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode() if resumed.stderr else ""
    assert json.loads((tmp_path / "run" / "report.json").read_text())["final"] is not None


def test_a_truncated_report_is_a_one_line_error(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "report.json").write_text('{"schema": "spiralkit.report/3", "name": "x", "rou')
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 2
    assert f"{run_dir / 'report.json'} is not a readable spiralkit report" in " ".join(result.output.split())


def test_compare_pages_name_runs_by_their_path_below_the_common_parent(tmp_path: Path) -> None:
    from spiralkit.cli import _run_names  # noqa: PLC0415 - the helper behind `spiral report A B --html`

    runs = [tmp_path / "study" / "seed0" / "spiral", tmp_path / "study" / "seed0" / "oneshot", tmp_path / "other"]
    assert _run_names(runs) == ["study/seed0/spiral", "study/seed0/oneshot", "other"]
    assert _run_names([tmp_path / "a" / "run", tmp_path / "a" / "run"]) == ["run", "run"]


def test_demo_into_an_earlier_demos_directory_says_to_start_over(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    (out / "recipe.yaml").write_text(TINY.replace("EPOCHS", "1"))  # e.g. the demo recipe of an earlier release
    result = CliRunner().invoke(app, ["demo", "--out", str(out)])
    assert result.exit_code == 2
    assert f"{out} holds a run of another demo recipe (an earlier spiralkit's): start over with `spiral demo --fresh`" \
        in " ".join(result.output.split())
