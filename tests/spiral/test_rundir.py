"""The run directory: one writer at a time, and only the recipe that started it may continue it."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

import spiralkit.export.weights as weights_module
from spiralkit.errors import SpiralError, StorageError
from spiralkit.spiral.fingerprint import FINGERPRINT, fingerprint, read_fingerprint
from spiralkit.spiral.recipe import parse_recipe
from spiralkit.spiral.rundir import LOCK, RunState, load_run_state, run_lock
from spiralkit.spiral.runner import Spiral
from tests.spiral.tiny import TINY



def quiet() -> Console:
    return Console(quiet=True)


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path: Path) -> None:
    with run_lock(tmp_path / "run"):
        with pytest.raises(SpiralError, match=r"run is in use by process \d+ on .*one run writes a run directory"):
            with run_lock(tmp_path / "run"):
                pass
    with run_lock(tmp_path / "run"):  # released: free again
        pass


def test_a_concurrent_spiral_run_in_another_process_exits_with_the_lock_error(tmp_path: Path) -> None:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    with run_lock(tmp_path / "run"):
        result = subprocess.run([sys.executable, "-m", "spiralkit", "run", str(recipe), "--out", str(tmp_path / "run")],
                                capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "is in use by process" in " ".join(result.stderr.split())
    assert not (tmp_path / "run" / "recipe.yaml").exists(), "the refused run wrote nothing"


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK).write_text("process 999999 on elsewhere\n")  # the file stays; its flock died with it
    with run_lock(run_dir):
        holder = (run_dir / LOCK).read_text()
        assert holder.startswith("process ") and "999999" not in holder


def test_out_that_is_a_file_is_a_one_line_error(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(SpiralError, match=f"cannot lock run directory {target}"):
        with run_lock(target):
            pass


def test_fingerprint_ignores_speed_and_data_root_but_not_results() -> None:
    base = fingerprint(parse_recipe(TINY))
    faster = fingerprint(parse_recipe(TINY.replace("threads: 1", "threads: 2").replace("repeats: 2", "repeats: 9")))
    assert base.differences(faster) == []
    other = fingerprint(parse_recipe(TINY.replace("seed: 1", "seed: 2").replace("target_sparsity: 0.5", "target_sparsity: 0.6")))
    assert base.differences(other) == ["prune.0.target_sparsity", "seed"]


def test_fingerprint_hashes_the_checkpoint_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file  # noqa: PLC0415
    from spiralkit.models import ModelSpec, load_model  # noqa: PLC0415

    model = load_model(ModelSpec(name="mlp", kwargs={"in_features": 64, "widths": [16]}))
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    text = TINY.replace("model: {name: mlp, kwargs: {in_features: 64, widths: [16]}}",
                        f"model: {{name: mlp, kwargs: {{in_features: 64, widths: [16]}}, checkpoint: {weights}}}")
    before = fingerprint(parse_recipe(text))
    changed = {name: tensor + 1 for name, tensor in model.state_dict().items()}
    save_file({k: v.contiguous() for k, v in changed.items()}, weights)
    assert before.differences(fingerprint(parse_recipe(text))) == ["model.checkpoint (file contents)"]


def test_a_moved_checkpoint_with_the_same_contents_is_the_same_recipe(tmp_path: Path) -> None:
    from safetensors.torch import save_file  # noqa: PLC0415
    from spiralkit.models import ModelSpec, load_model  # noqa: PLC0415

    model = load_model(ModelSpec(name="mlp", kwargs={"in_features": 64, "widths": [16]}))
    old, new = tmp_path / "old" / "w.safetensors", tmp_path / "moved" / "w.safetensors"
    for path in (old, new):
        path.parent.mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    spec = "model: {name: mlp, kwargs: {in_features: 64, widths: [16]}}"
    at = {path: TINY.replace(spec, spec[:-1] + f", checkpoint: {path}}}") for path in (old, new)}
    assert fingerprint(parse_recipe(at[old])).differences(fingerprint(parse_recipe(at[new]))) == []
    without = fingerprint(parse_recipe(TINY))  # no file to compare: the key itself differs
    assert fingerprint(parse_recipe(at[old])).differences(without) == ["model.checkpoint"]


def test_resume_with_a_changed_recipe_is_refused_naming_the_keys(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    Spiral(parse_recipe(TINY)).run(run_dir, console=quiet())
    assert read_fingerprint(run_dir) is not None
    state = (run_dir / "state.json").read_text()
    changed = parse_recipe(TINY.replace("seed: 1", "seed: 7").replace("widths: [16]", "widths: [32]"))
    with pytest.raises(SpiralError, match=r"different recipe: model\.kwargs\.widths\.0, seed differ"):
        Spiral(changed).run(run_dir, resume=True, console=quiet())
    assert (run_dir / "state.json").read_text() == state, "nothing was touched"
    # the same recipe with other threads and measurement settings resumes
    Spiral(parse_recipe(TINY.replace("threads: 1", "threads: 2"))).run(run_dir, resume=True, console=quiet())


def test_out_into_another_recipes_directory_is_refused_even_before_its_first_state(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(TINY)  # a run killed before its first state.json
    with pytest.raises(SpiralError, match="different recipe: seed differ"):
        Spiral(parse_recipe(TINY.replace("seed: 1", "seed: 2"))).run(run_dir, console=quiet())
    assert (run_dir / "recipe.yaml").read_text() == TINY


def test_a_run_directory_written_before_fingerprints_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    Spiral(parse_recipe(TINY)).run(run_dir, console=quiet())
    (run_dir / FINGERPRINT).unlink()  # as written by spiralkit before fingerprints
    report = Spiral(parse_recipe(TINY)).run(run_dir, resume=True, console=quiet())
    assert report.final is not None and (run_dir / FINGERPRINT).exists()


def test_state_written_before_the_refactor_loads(tmp_path: Path) -> None:
    """state.json as spiralkit wrote it before RunState shared the report's Outcome (keys in the old order)."""
    old = ('{"schema": "spiralkit.state/2", "baseline": null, "rounds": [], "accepted": 0, "stage": 0, '
           '"stage_accepted": 0, "progress": 0.0, "scale": 1.0, "student": null, "checkpoint": null, '
           '"stage_stops": [], "stopped": null, "pruned": null, "quantization": null, "final": null}')
    (tmp_path / "state.json").write_text(old)
    assert load_run_state(tmp_path) == RunState()


def test_a_truncated_state_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text('{"schema": "spiralkit.state/2", "rounds": [')
    with pytest.raises(SpiralError, match=r"state\.json is not a run state spiralkit can resume"):
        load_run_state(tmp_path)


@pytest.mark.parametrize(("code", "text"), [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")])
def test_a_failing_write_is_one_line_naming_the_file_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, text: str
) -> None:
    run_dir = tmp_path / "run"
    real_fsync = weights_module.os.fsync
    writes = {"count": 0}

    def failing_fsync(fd: int) -> None:  # the third file written fails: the disk is full / read-only
        writes["count"] += 1
        if writes["count"] == 3:
            raise OSError(code, text)
        real_fsync(fd)

    monkeypatch.setattr(weights_module.os, "fsync", failing_fsync)
    with pytest.raises(StorageError, match=rf"^cannot write {run_dir}/\S+: {text}$"):
        Spiral(parse_recipe(TINY)).run(run_dir, console=quiet())
    assert not list(run_dir.glob("**/.*.tmp")), "no temporary file left behind"
    monkeypatch.setattr(weights_module.os, "fsync", real_fsync)
    resumed = Spiral(parse_recipe(TINY)).run(run_dir, resume=(run_dir / "state.json").exists(), console=quiet())
    fresh = Spiral(parse_recipe(TINY)).run(tmp_path / "fresh", console=quiet())
    assert resumed.final is not None and fresh.final is not None
    assert resumed.final.metric == fresh.final.metric and resumed.final.nonzero_params == fresh.final.nonzero_params


def test_a_train_section_fine_tunes_the_checkpoint(tmp_path: Path) -> None:
    """With a checkpoint and a train section the baseline starts from the checkpoint and is trained."""
    from safetensors.torch import save_file  # noqa: PLC0415
    from spiralkit.export import load_state  # noqa: PLC0415
    from spiralkit.models import ModelSpec, load_model  # noqa: PLC0415

    torch.manual_seed(5)
    start = load_model(ModelSpec(name="mlp", kwargs={"in_features": 64, "widths": [16]}))
    weights = tmp_path / "start.safetensors"
    save_file({k: v.contiguous() for k, v in start.state_dict().items()}, weights)
    spec = f"model: {{name: mlp, kwargs: {{in_features: 64, widths: [16]}}, checkpoint: {weights}}}"
    text = TINY.replace("model: {name: mlp, kwargs: {in_features: 64, widths: [16]}}", spec)
    Spiral(parse_recipe(text)).run(tmp_path / "tuned", console=quiet())
    tuned = load_state(tmp_path / "tuned" / "baseline.safetensors")
    as_is = TINY.replace("model: {name: mlp, kwargs: {in_features: 64, widths: [16]}}", spec).replace(
        "train: {epochs: 1, optimizer: {name: adam, lr: 0.01}}\n", "")
    Spiral(parse_recipe(as_is)).run(tmp_path / "as_is", console=quiet())
    kept = load_state(tmp_path / "as_is" / "baseline.safetensors")
    assert all(torch.equal(kept[k], v) for k, v in start.state_dict().items()), "no train section: the checkpoint as is"
    assert not all(torch.equal(tuned[k], v) for k, v in start.state_dict().items()), "a train section trains it"
