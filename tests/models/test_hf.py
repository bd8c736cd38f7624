"""Hugging Face text models: the packed (batch, 2, seq) convention, heads, padding, taps, export, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from spiralkit.errors import ModelError
from spiralkit.export.weights import save_weights
from spiralkit.models import ModelSpec, load_model
from spiralkit.models import hf as hf_module
from spiralkit.models.hf import (
    HFTextModel,
    attention_modules,
    encode_texts,
    load_tokenizer,
    masked_mean,
    set_attention,
    trim_padding,
)

transformers = pytest.importorskip("transformers")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "bad", "movie", "the", "plot", "."]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random BERT (hidden 16, 4 heads) and a 12-word tokenizer, saved as a local HF directory."""
    directory = tmp_path_factory.mktemp("tiny-bert")
    config = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(directory)
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(directory)
    return directory


def _spec(directory: Path, **kwargs: object) -> ModelSpec:
    return ModelSpec(name="hf", kwargs={"path": str(directory), **kwargs})


def _batch(directory: Path, max_length: int = 10) -> Tensor:
    tokenizer = load_tokenizer(directory)
    return encode_texts(tokenizer, ["a good movie .", "the plot", "a bad bad movie , the plot ."], max_length=max_length)


def test_packed_input_gives_logits_or_unit_embeddings(tiny_dir: Path) -> None:
    x = _batch(tiny_dir)
    assert x.shape == (3, 2, 10) and x.dtype == torch.int64
    assert x[1, 1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]  # [CLS] the plot [SEP], then padding
    classifier = load_model(_spec(tiny_dir, num_labels=3))
    embedder = load_model(_spec(tiny_dir, head="embedding"))
    assert isinstance(classifier, HFTextModel) and not classifier.training
    with torch.no_grad():
        assert classifier(x).shape == (3, 3)
        embeddings = embedder(x)
    assert embeddings.shape == (3, 16)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3))


def test_embedding_is_the_masked_mean_of_the_last_hidden_states_normalised(tiny_dir: Path) -> None:
    model = load_model(_spec(tiny_dir, head="embedding", trim_padding=False))
    x = _batch(tiny_dir)
    with torch.no_grad():
        hidden = model.encoder(input_ids=x[:, 0], attention_mask=x[:, 1]).last_hidden_state
        mask = x[:, 1].unsqueeze(-1).float()
        expected = (hidden * mask).sum(1) / mask.sum(1)
        torch.testing.assert_close(model(x), expected / expected.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(masked_mean(hidden, x[:, 1]), expected)


@pytest.mark.parametrize(("head", "pooling"), [("classifier", "mean"), ("classifier", "cls"), ("embedding", "mean")])
def test_appending_padding_does_not_change_outputs(tiny_dir: Path, head: str, pooling: str) -> None:
    x = _batch(tiny_dir, max_length=10)
    padded = torch.cat([x, torch.zeros(3, 2, 7, dtype=torch.long)], dim=-1)
    for trim in (True, False):
        model = load_model(_spec(tiny_dir, head=head, pooling=pooling, trim_padding=trim))
        with torch.no_grad():
            torch.testing.assert_close(model(padded), model(x), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(model(x[1:2]), model(x)[1:2], atol=1e-6, rtol=1e-5)


def test_trim_padding_cuts_only_trailing_all_padding_columns() -> None:
    x = torch.tensor([[[5, 6, 0, 7, 0, 0], [1, 1, 0, 1, 0, 0]], [[5, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]])
    assert trim_padding(x).shape == (2, 2, 4)
    assert trim_padding(x[:, :, :4]) is not None and torch.equal(trim_padding(x[:, :, :4]), x[:, :, :4])
    assert trim_padding(torch.zeros(1, 2, 5, dtype=torch.long)).shape == (1, 2, 1)


def test_checkpoint_round_trip_restores_the_classifier(tiny_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = load_model(_spec(tiny_dir))
    save_weights(model, tmp_path / "w.safetensors")
    torch.manual_seed(2)  # another random classifier layer, replaced by the checkpoint's
    again = load_model(_spec(tiny_dir).model_copy(update={"checkpoint": tmp_path / "w.safetensors"}))
    x = _batch(tiny_dir)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    assert "encoder.encoder.layer.1.attention.self.query.weight" in model.state_dict()
    assert not any("pooler" in key for key in model.state_dict())


def test_attention_probabilities_are_captured_by_module_name_in_eager_mode(tiny_dir: Path) -> None:
    model = load_model(_spec(tiny_dir, head="embedding"))
    names = attention_modules(model)
    assert names == ("encoder.encoder.layer.0.attention.self", "encoder.encoder.layer.1.attention.self")
    captured: list[object] = []
    model.get_submodule(names[1]).register_forward_hook(lambda module, args, out: captured.append(out[1]))
    x = _batch(tiny_dir, max_length=12)
    with torch.no_grad():
        model(x)
        assert captured[-1] is None  # sdpa computes no probabilities
        set_attention(model, "eager")
        model(x)
    probabilities = captured[-1]
    assert isinstance(probabilities, Tensor) and probabilities.shape == (3, 4, 10, 10)  # trimmed to the longest row
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(3, 4, 10))
    assert float(probabilities[1, :, :, 4:].abs().max()) == 0.0  # padding keys get no attention
    eager = load_model(_spec(tiny_dir, head="embedding", attention="eager"))
    with torch.no_grad():
        torch.testing.assert_close(eager(x), model(x))


def test_onnx_export_keeps_the_full_sequence_length(tiny_dir: Path, tmp_path: Path) -> None:
    from spiralkit.export.onnx import export_onnx, verify_onnx

    model = load_model(_spec(tiny_dir, head="embedding"))
    x = _batch(tiny_dir, max_length=12)  # padded: eager mode would trim it to 10 columns
    path = export_onnx(model, x, tmp_path / "tiny.onnx")
    full = torch.randint(5, len(WORDS), (2, 2, 12))
    full[:, 1] = 1  # every column holds a token: a graph that kept the trimmed length would disagree
    verify_onnx(model, path, full)
    verify_onnx(model, path, x)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"head": "pooler"}, "head must be one of 'classifier', 'embedding', 'lm', 'image', got 'pooler'"),
        ({"pooling": "max"}, "pooling must be one of 'mean', 'cls', got 'max'"),
        ({"attention": "flash"}, "attention must be one of 'sdpa', 'eager', got 'flash'"),
        ({"num_labels": 0}, "num_labels must be a positive integer, got 0"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\), got 1.5"),
        ({"encoder_dropout": -0.1}, r"encoder_dropout must be in \[0, 1\), got -0.1"),
        ({"heads": 2}, r"bad arguments for model 'hf'.*accepted: path, head, num_labels"),
    ],
)
def test_bad_options_are_named(tiny_dir: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ModelError, match=message):
        load_model(_spec(tiny_dir, **kwargs))


def test_encoder_dropout_overrides_the_config_and_makes_training_deterministic(tiny_dir: Path) -> None:
    x = _batch(tiny_dir)
    default = load_model(_spec(tiny_dir, head="embedding")).train()
    quiet = load_model(_spec(tiny_dir, head="embedding", encoder_dropout=0.0)).train()
    assert default.encoder.config.hidden_dropout_prob == 0.1
    assert quiet.encoder.config.hidden_dropout_prob == quiet.encoder.config.attention_probs_dropout_prob == 0.0
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.equal(quiet(x), quiet(x))  # no dropout noise in train mode
        assert not torch.equal(default(x), default(x))
        assert torch.allclose(quiet(x), default.eval()(x))  # same weights


def test_encoder_dropout_on_a_config_without_those_keys_is_named(tmp_path: Path) -> None:
    config = transformers.DistilBertConfig(vocab_size=len(WORDS), dim=16, n_layers=1, n_heads=4, hidden_dim=32,
                                           max_position_embeddings=32)
    transformers.DistilBertModel(config).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=r"DistilBertConfig has no hidden_dropout_prob, attention_probs_dropout_prob"):
        load_model(_spec(tmp_path, encoder_dropout=0.0))


def test_missing_or_unusable_directories_are_named(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=f"{tmp_path / 'nowhere'} does not exist"):
        load_model(_spec(tmp_path / "nowhere"))
    with pytest.raises(ModelError, match=f"{tmp_path} has no config.json"):
        load_model(_spec(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=f"cannot load a Hugging Face model from {tmp_path}"):
        load_model(_spec(tmp_path))
    with pytest.raises(ModelError, match=f"cannot load a tokenizer from {tmp_path}"):
        load_tokenizer(tmp_path)


def test_packaged_alias_errors() -> None:
    with pytest.raises(ModelError, match="unknown packaged Hugging Face model 'nope'; known: 'minilm-l6'"):
        load_model(ModelSpec(name="hf:nope"))
    with pytest.raises(ModelError, match="unexpected keyword argument 'path'"):
        load_model(ModelSpec(name="hf:minilm-l6", kwargs={"path": "."}))


def test_packaged_model_without_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf_module, "PACKAGED_MODELS", {"ghost": ("spiralkit_no_such_module", "ghost-weights")})
    with pytest.raises(ModelError, match="packaged model 'ghost' needs the pip package 'ghost-weights'"):
        hf_module.packaged_model_dir("ghost")


def test_wrong_input_shape_and_other_misuse(tiny_dir: Path) -> None:
    model = load_model(_spec(tiny_dir))
    with pytest.raises(ValueError, match=r"takes \(batch, 2, seq\) stacked input ids and attention mask, got shape \(3, 10\)"):
        model(torch.zeros(3, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="max_length must be at least 2, got 1"):
        encode_texts(load_tokenizer(tiny_dir), ["a"], max_length=1)
    with pytest.raises(ValueError, match="needs at least one text"):
        encode_texts(load_tokenizer(tiny_dir), [], max_length=8)
    with pytest.raises(ValueError, match="Linear holds no Hugging Face model"):
        set_attention(torch.nn.Linear(2, 2), "eager")
    with pytest.raises(ValueError, match="implementation must be one of 'sdpa', 'eager'"):
        set_attention(model, "fast")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the real MiniLM


def test_packaged_minilm_matches_sentence_transformers() -> None:
    """all-MiniLM-L6-v2 from the pip package, offline: related sentences are closer than unrelated ones.

    The reference cosines were computed once with sentence-transformers 6.2.0
    (``SentenceTransformer(<packaged dir>).encode``) on the same packaged weights.
    """
    model = load_model(ModelSpec(name="hf:minilm-l6", kwargs={"head": "embedding"}))
    assert len(model.encoder.encoder.layer) == 6 and model.encoder.config.hidden_size == 384
    tokenizer = load_tokenizer("minilm-l6")
    sentences = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell sharply today."]
    with torch.no_grad():
        e = model(encode_texts(tokenizer, sentences, max_length=64))
    related, unrelated = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert related > unrelated + 0.5
    assert related == pytest.approx(0.66745, abs=1e-3)
    assert unrelated == pytest.approx(-0.05403, abs=1e-3)
