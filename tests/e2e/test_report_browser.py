"""report.html and compare.html from tiny real runs: written by the runner and `spiral report --html`,
opened in headless Chromium (screenshot, no console errors, the plots in the DOM).

Chromium is Debian's ``chromium``; without it the browser test skips, unless
``SPIRALKIT_REQUIRE_BROWSER=1`` (CI) makes its absence a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from spiralkit.cli import app
from spiralkit.spiral import Spiral, parse_recipe
from tests.spiral.tiny import TINY

HOSTILE = "<script>alert('x')</script>"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two finished tiny runs: the tiny recipe, and the same at 70% sparsity quantized to 8 bits."""
    root = tmp_path_factory.mktemp("runs")
    second = TINY.replace("target_sparsity: 0.5", "target_sparsity: 0.7") + "quantize: {kind: compact, bits: 8}\n"
    for name, text in (("half", TINY), ("seventy", second)):
        Spiral(parse_recipe(text)).run(root / name, console=Console(quiet=True))
    return root / "half", root / "seventy"


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def _error(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    return " ".join(result.output.split())


def test_runner_writes_report_html(runs: tuple[Path, Path]) -> None:
    half, seventy = runs
    page = (half / "report.html").read_text()
    assert page.count("<svg") == 5 and "fc1.weight" in page and "target_sparsity: 0.5" in page
    assert "Training loss per epoch" in page  # from curves.json
    assert "bits per layer" in (seventy / "report.html").read_text()


def test_report_html_rerendered_with_a_hostile_recipe(runs: tuple[Path, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    (run / "report.html").unlink()
    (run / "recipe.yaml").write_text(f"# {HOSTILE}\n" + (run / "recipe.yaml").read_text())
    assert f"wrote {run / 'report.html'}" in _cli("report", str(run), "--html")
    page = (run / "report.html").read_text()
    assert "<script" not in page and "# &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page


def test_report_html_of_a_run_written_before_html(runs: tuple[Path, Path], tmp_path: Path) -> None:
    """An old run: report.json without rounds/final, no recipe.yaml, no model.safetensors."""
    data = json.loads((runs[0] / "report.json").read_text())
    for key in ("rounds", "final", "stopped", "pruned", "quantization", "student"):
        data.pop(key, None)
    (tmp_path / "report.json").write_text(json.dumps(data))
    _cli("report", str(tmp_path), "--html", "--out", str(tmp_path / "html"))
    page = (tmp_path / "html" / "report.html").read_text()
    assert "run not finished" in page and page.count("<svg") == 1


def test_report_html_of_a_run_without_curves(runs: tuple[Path, Path], tmp_path: Path) -> None:
    """A run written before curves.json: the page renders without the training-loss plot."""
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    (run / "curves.json").unlink()
    _cli("report", str(run), "--html")
    page = (run / "report.html").read_text()
    assert page.count("<svg") == 4 and "Training loss" not in page


def test_report_html_with_corrupt_curves_is_one_line(runs: tuple[Path, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    (run / "curves.json").write_text('{"schema": "spiralkit.curves/9"}')
    message = _error("report", str(run), "--html")
    assert "curves.json is not a spiralkit curves file" in message and "delete it to render without curves" in message


def test_compare_html(runs: tuple[Path, Path], tmp_path: Path) -> None:
    half, seventy = runs
    assert "compare.html" in _cli("report", str(half), str(seventy), "--html", "--out", str(tmp_path))
    page = (tmp_path / "compare.html").read_text()
    assert page.count("<svg") == 1 and "Pareto front" in page
    assert "<td>prune.0.target_sparsity</td><td>0.5</td><td>0.7</td>" in page
    assert "<td>quantize.kind</td><td>(absent)</td><td>compact</td>" in page


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["report", "nowhere", "--html"], "nowhere is not a run directory"),
        (["report", "RUN", "nowhere", "--html", "--out", "o"], "nowhere is not a run directory"),
        (["report", "RUN", "RUN", "--html"], "give its directory with --out OUT_DIR"),
        (["report", "RUN", "--out", "o"], "--out goes with --html"),
        (["report", "RUN", "--html", "--out", "RUN/report.json"], "cannot create"),
    ],
)
def test_report_html_errors(args: list[str], message: str, runs: tuple[Path, Path], tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert message in _error(*(arg.replace("RUN", str(runs[0])) for arg in args))


def test_report_html_with_corrupt_weights_is_one_line(runs: tuple[Path, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    (run / "model.safetensors").write_bytes(b"junk")
    assert "model.safetensors" in _error("report", str(run), "--html")


def _chromium() -> str | None:
    found = shutil.which("chromium")
    if found is None and os.environ.get("SPIRALKIT_REQUIRE_BROWSER") == "1":
        pytest.fail("SPIRALKIT_REQUIRE_BROWSER=1 but chromium is not installed")
    return found


def _open(chromium: str, page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium on ``page`` (a fresh profile, console messages logged to stderr)."""
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", *extra, page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_pages_render_in_chromium(runs: tuple[Path, Path], tmp_path: Path) -> None:
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (SPIRALKIT_REQUIRE_BROWSER=1 makes this a failure)")
    _cli("report", *map(str, runs), "--html", "--out", str(tmp_path))
    for page, plots in ((runs[1] / "report.html", 5), (tmp_path / "compare.html", 1)):
        shot = tmp_path / f"{page.stem}.png"
        taken = _open(chromium, page, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000")
        assert taken.returncode == 0, taken.stderr[-2000:]
        dom = _open(chromium, page, tmp_path, "--dump-dom")
        for log in (taken.stderr, dom.stderr):
            assert "Uncaught" not in log and "ERROR:CONSOLE" not in log, log[-2000:]
        assert dom.stdout.count("<svg") == plots and "</table>" in dom.stdout
        with Image.open(shot) as image:
            assert image.size == (1280, 2000)
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colours is None or len(colours) > 50  # drawn: text and plots, not one blank colour
