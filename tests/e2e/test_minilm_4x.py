"""recipes/minilm_sst2_4x.yaml's stages end to end on a tiny local BERT.

The recipe file itself is read; only what names the real model and data (model, data, the
layer map of a 6-layer teacher) and the budget (epochs, batches, repeats) are swapped for the
tiny BERT's. The stages — a shallow student, structured rounds on heads and FFN neurons with
distillation from the teacher, dynamic int8 — and their keys are the recipe's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from spiralkit.data import load_data
from spiralkit.errors import SpiralError
from spiralkit.export import load_state
from spiralkit.spiral.recipe import parse_recipe
from spiralkit.spiral.runner import Spiral
from tests.e2e.test_text import _save_bert, quiet

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "minilm_sst2_4x.yaml"
GOOD = ["a good movie .", "good plot", "the good movie", "a good good plot .", "good .", "the plot good ."]
BAD = ["a bad movie .", "bad plot", "the bad movie", "a bad bad plot .", "bad .", "the plot bad ."]
WIDTH, FFN, HEADS = 32, 64, 4  # the tiny BERT's hidden size, FFN width and heads per layer


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_bert(tmp_path_factory.mktemp("tiny-bert-4x"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data-4x")
    (root / "sst2").mkdir()
    pairs = [*((s, 1) for s in GOOD), *((s, 0) for s in BAD)]
    rows = [f"{s} \t{label}" for _ in range(6) for s, label in pairs]
    (root / "sst2" / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    (root / "sst2" / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(f"{s} \t{y}" for s, y in pairs) + "\n")
    return root


def tiny(recipe: dict[str, Any], bert: Path, root: Path) -> dict[str, Any]:
    """The recipe with the tiny BERT, its data and a test's budget; its stages untouched."""
    out = json.loads(json.dumps(recipe))
    out["model"] = {"name": "hf", "kwargs": {"path": str(bert), "head": "classifier"}}
    out["data"] = {"name": "sst2", "root": str(root), "batch_size": 8, "eval_batch_size": 16, "val_fraction": 0.2,
                   "kwargs": {"tokenizer": str(bert), "max_length": 12}}
    out["train"] = {"epochs": 8, "optimizer": {"name": "adamw", "lr": 0.003}}  # the 4-layer teacher, fine-tuned here
    student = out["student"]["distill"]
    student["losses"][1]["map"] = [["encoder.encoder.layer.0", "encoder.encoder.layer.1"],
                                   ["encoder.encoder.layer.1", "encoder.encoder.layer.3"]]
    student["train"] |= {"epochs": 6, "optimizer": {"name": "adamw", "lr": 0.003}}
    out["recover"]["train"] |= {"epochs": 3, "max_batches": 8, "optimizer": {"name": "adamw", "lr": 0.003}}
    out["targets"] = {**out["targets"], "max_metric_drop": 100.0}
    out["measure"] = {**out["measure"], "batch_size": 8, "repeats": 2, "warmup": 1}
    return out


def test_the_4x_recipe_reads_the_teacher_and_chains_student_prune_and_int8() -> None:
    recipe = parse_recipe(RECIPE.read_text(), source=str(RECIPE))
    assert recipe.model.checkpoint == Path("runs/minilm_sst2_finetune/model.safetensors")
    assert recipe.student is not None and recipe.student.architecture.kind == "shallow"
    assert [(s.kind, s.heads) for s in recipe.prune] == [("structured", True)]
    assert recipe.recover.kind == "distill" and recipe.quantize is not None and recipe.quantize.kind == "dynamic-int8"
    assert recipe.quantize.per_channel
    assert (recipe.measure.batch_size, recipe.measure.threads, recipe.data.kwargs["max_length"]) == (32, 1, 64)


@pytest.mark.slow
def test_the_recipe_s_stages_run_end_to_end_on_a_tiny_bert(bert: Path, data_root: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    text = yaml.safe_dump(tiny(yaml.safe_load(RECIPE.read_text()), bert, data_root), sort_keys=False)
    report = Spiral(parse_recipe(text, source="tiny 4x recipe")).run(tmp_path / "run", console=quiet())
    assert report.baseline.metric >= 90.0  # the fine-tuned 4-layer teacher separates "good" from "bad"
    assert report.student is not None and report.pruned is not None and report.final is not None
    # The student halves the layers; the rounds go on to 70% fewer MACs than the teacher.
    assert 0.35 < 1 - report.student.macs / report.baseline.macs < 0.6
    kept = [r for r in report.rounds if r.accepted]
    assert kept and report.pruned.macs <= 0.32 * report.baseline.macs
    # Heads and FFN neurons went, the residual width stayed.
    weights = load_state(tmp_path / "run" / "model.safetensors")
    assert {k.split(".")[3] for k in weights if k.startswith("encoder.encoder.layer.")} == {"0", "1"}
    query, ffn = weights["encoder.encoder.layer.0.attention.self.query.weight"], weights["encoder.encoder.layer.0.intermediate.dense.weight"]
    assert query.shape[1] == WIDTH and query.shape[0] < WIDTH and query.shape[0] % (WIDTH // HEADS) == 0
    assert ffn.shape[1] == WIDTH and ffn.shape[0] < FFN
    # Int8 last, timed in its runtime; the baseline is the eager fp32 teacher at the recipe's batch.
    assert report.quantization is not None and report.quantization.kind == "dynamic-int8"
    assert report.quantization.artefact.endswith(".onnx") and (tmp_path / "run" / report.quantization.artefact).exists()
    assert report.final.latency_runtime == "ort" and report.baseline.latency_runtime == "eager"
    assert report.baseline.latency_batch_size == 8 and report.final.size_bytes < report.pruned.dense_size_bytes
    assert report.final.metric >= report.pruned.metric - 20.0  # int8 of a tiny model: close, not equal
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["final"]["latency_ms"] > 0 and saved["baseline"]["latency_ms"] > 0
    # The benchmark rebuilds the five models from the run directory and times them interleaved.
    from bench.minilm_4x import build, contract, interleave

    recipe = parse_recipe(text)
    data = load_data(recipe.data, seed=recipe.seed)
    named, sizes = build(tmp_path / "run", data, other=False)
    assert list(named) == ["teacher eager", "teacher ORT", "student", "pruned student", "final"]
    x = next(iter(data.test))[0][:4]
    with torch.no_grad():
        assert torch.allclose(named["teacher ORT"](x), named["teacher eager"](x), atol=1e-4)
        assert named["pruned student"](x).shape == named["final"](x).shape == (4, 2)
    assert sizes["final"] < sizes["pruned student"] < sizes["student"] < sizes["teacher eager"]
    medians = interleave(named, x, repeats=2, warmup=0)
    assert set(medians) == set(named) and all(ms > 0 for ms in medians.values())
    speed = saved["baseline"]["latency_ms"] / saved["final"]["latency_ms"]
    assert contract(tmp_path / "run").startswith("report.json: baseline ") and f"{speed:.2f}x faster" in contract(tmp_path / "run")


def test_the_benchmark_names_the_missing_file_of_an_unfinished_run(tmp_path: Path) -> None:
    from bench.minilm_4x import check_run

    with pytest.raises(SpiralError, match=r"recipe\.yaml is missing: bench\.minilm_4x needs a finished run"):
        check_run(tmp_path)
    for name in ("recipe.yaml", "baseline.safetensors", "student.json", "student.safetensors", "model.safetensors"):
        (tmp_path / name).write_text("")
    with pytest.raises(SpiralError, match=r"has no int8 ONNX final model"):
        check_run(tmp_path)


@pytest.mark.slow
def test_static_int8_calibrates_a_text_model_on_its_token_ids(bert: Path, data_root: Path, tmp_path: Path) -> None:
    """Token ids reach ONNX Runtime's calibrator as int64 (they were cast to float32, which it refused)."""
    from spiralkit.models import ModelSpec, load_model
    from spiralkit.quant.ort import BatchReader
    from spiralkit.quant.ptq import StaticInt8, quantize

    ids = torch.tensor([[[2, 6, 3], [1, 1, 1]]])
    assert BatchReader([ids]).get_next()["input"].dtype == ids.numpy().dtype  # int64, unchanged
    assert str(BatchReader([torch.ones(1, 3, dtype=torch.float64)]).get_next()["input"].dtype) == "float32"
    torch.set_num_threads(1)
    model = load_model(ModelSpec(name="hf", kwargs={"path": str(bert), "head": "classifier"})).eval()
    spec = parse_recipe(yaml.safe_dump(tiny(yaml.safe_load(RECIPE.read_text()), bert, data_root))).data
    data = load_data(spec, seed=0)
    x = next(iter(data.test))[0][:4]
    result = quantize(model, StaticInt8(calibration_batches=2), data.train, example=x, workdir=tmp_path)
    with torch.no_grad():
        assert (result.model(x) - model(x)).abs().max() < 0.5
