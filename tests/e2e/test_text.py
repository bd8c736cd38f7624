"""Whole text recipes on a tiny local BERT: fine-tune, distil a shallow student, embedding fidelity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from rich.console import Console

from spiralkit.spiral.recipe import parse_recipe
from spiralkit.spiral.export import export_run
from spiralkit.spiral.runner import Spiral

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "bad", "movie", "the", "plot", "."]
GOOD = ["a good movie .", "good plot", "the good movie", "a good good plot .", "good ."]
BAD = ["a bad movie .", "bad plot", "the bad movie", "a bad bad plot .", "bad ."]


def _save_bert(directory: Path, *, initializer_range: float = 0.02) -> Path:
    config = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32,
                                     initializer_range=initializer_range)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(directory)
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer random BERT and its word-level tokenizer, saved as a local Hugging Face directory."""
    return _save_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def rough_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same with large random weights, so that every layer changes the embeddings a lot."""
    return _save_bert(tmp_path_factory.mktemp("rough-bert"), initializer_range=0.5)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "sst2").mkdir()
    rows = [f"{s} \t{label}" for _ in range(8) for s, label in [*((g, 1) for g in GOOD), *((b, 0) for b in BAD)]]
    (root / "sst2" / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    dev = [f"{s} \t{label}" for s, label in [*((g, 1) for g in GOOD), *((b, 0) for b in BAD)]]
    (root / "sst2" / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(dev) + "\n")
    return root


def recipe_text(bert: Path, root: Path, *, head: str, task: str, student: str, train: str = "") -> str:
    return f"""\
name: text
seed: 0
threads: 1
model: {{name: hf, kwargs: {{path: "{bert}", head: {head}}}}}
data: {{name: sst2, root: "{root}", batch_size: 8, eval_batch_size: 16, val_fraction: 0.2,
        kwargs: {{tokenizer: "{bert}", max_length: 12}}}}
task: {task}
{train}
student: {student}
measure: {{batch_size: 8, repeats: 3, warmup: 1}}
"""


def quiet() -> Console:
    return Console(quiet=True)


def test_fine_tune_then_distil_a_shallow_student_that_exports(bert: Path, data_root: Path, tmp_path: Path) -> None:
    student = """
  architecture: {kind: shallow, every: 2}
  distill:
    kind: distill
    alpha: 0.5
    temperature: 2.0
    losses:
      - logits
      - {kind: layers, adapt: false, map: [[encoder.encoder.layer.0, encoder.encoder.layer.1],
                                           [encoder.encoder.layer.1, encoder.encoder.layer.3]]}
    train: {epochs: 6, optimizer: {name: adamw, lr: 0.003}}"""
    text = recipe_text(bert, data_root, head="classifier", task="{kind: classification}", student=student,
                       train="train: {epochs: 8, optimizer: {name: adamw, lr: 0.003}}")
    report = Spiral(parse_recipe(text)).run(tmp_path / "run", console=quiet())
    assert report.baseline.metric >= 90.0  # the fine-tuned teacher separates "good" from "bad"
    assert report.student is not None and report.student.metric >= 80.0
    assert report.student.macs < 0.75 * report.baseline.macs and report.student.params < report.baseline.params
    check = export_run(tmp_path / "run").check  # 2 of 4 layers rebuilt from student.json; ONNX matches
    assert check.max_abs_diff < 1e-4


def test_embedding_fidelity_student_learns_from_unlabeled_sentences(
    rough_bert: Path, data_root: Path, tmp_path: Path
) -> None:
    def student(epochs: int) -> str:
        return ("{architecture: {kind: shallow, keep: [0]}, distill: {kind: distill, losses: [{kind: outputs}], "
                f"train: {{epochs: {epochs}, optimizer: {{name: adamw, lr: 0.005}}}}}}}}")

    reports = [
        Spiral(parse_recipe(recipe_text(rough_bert, data_root, head="embedding", task="fidelity",
                                        student=student(epochs))))
        .run(tmp_path / f"run{epochs}", console=quiet())
        for epochs in (0, 6)
    ]
    untrained, trained = (r.student for r in reports)
    assert reports[0].baseline.metric == pytest.approx(1.0, abs=1e-5)  # the original against itself
    assert untrained is not None and trained is not None
    assert trained.metric > untrained.metric + 0.02 and trained.metric <= 1.0
