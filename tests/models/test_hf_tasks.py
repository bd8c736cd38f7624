"""``hf`` causal LMs (``head="lm"``) and image classifiers (``head="image"``) from local directories."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from spiralkit.errors import ModelError
from spiralkit.models import ModelSpec, load_model
from spiralkit.models.hf import HFCausalLM, HFImageModel
from spiralkit.prune.apply import apply_plan
from spiralkit.prune.structured import StructuredPrune, plan_pruning

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-vit")
    config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, num_labels=5)
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(directory)
    return directory


def test_a_causal_lm_maps_ids_to_logits_and_generates_with_its_heads_pruned(llama_dir: Path) -> None:
    torch.set_num_threads(1)
    model = load_model(ModelSpec(name="hf", kwargs={"path": str(llama_dir), "head": "lm"}))
    assert isinstance(model, HFCausalLM) and not model.training
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(ids).shape == (2, 5, 64)
    plan = plan_pruning(model, StructuredPrune(ratio=0.5), example=ids[:1])
    assert [(h.kind, h.num_heads, len(h.keep)) for h in plan.heads] == [("hf_qkvo", 2, 1)] * 2
    masked = apply_plan(copy.deepcopy(model), plan, mode="mask")
    apply_plan(model, plan, mode="remove")
    with torch.no_grad():
        assert torch.allclose(model(ids), masked(ids), atol=1e-5)
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3,
                                   do_sample=False, pad_token_id=0)
        step = model(generated[:, :-1])[:, -1].argmax(-1)
    assert generated.shape == (2, 8) and torch.equal(step, generated[:, -1])
    with pytest.raises(ValueError, match=r"HFCausalLM takes \(batch, seq\) integer token ids, got torch.float32"):
        model(torch.zeros(2, 5))


def test_an_image_model_keeps_its_head_or_gets_a_new_one(vit_dir: Path) -> None:
    torch.set_num_threads(1)
    pixels = torch.randn(2, 3, 16, 16)
    own = load_model(ModelSpec(name="hf", kwargs={"path": str(vit_dir), "head": "image"}))
    three = load_model(ModelSpec(name="hf", kwargs={"path": str(vit_dir), "head": "image", "num_labels": 3}))
    assert isinstance(own, HFImageModel)
    with torch.no_grad():
        assert own(pixels).shape == (2, 5) and three(pixels).shape == (2, 3)
    assert torch.equal(own.vision.vit.layers[0].attention.q_proj.weight, three.vision.vit.layers[0].attention.q_proj.weight)
    with pytest.raises(ValueError, match=r"HFImageModel takes \(batch, channels, height, width\) float pixels"):
        own(torch.zeros(2, 16, dtype=torch.long))


def test_text_encoder_options_are_refused_for_lm_and_image(llama_dir: Path, vit_dir: Path) -> None:
    with pytest.raises(ModelError, match="pooling='cls' is a text-encoder option; head='lm' does not take it"):
        load_model(ModelSpec(name="hf", kwargs={"path": str(llama_dir), "head": "lm", "pooling": "cls"}))
    with pytest.raises(ModelError, match="num_labels=3: head='lm' has no classifier"):
        load_model(ModelSpec(name="hf", kwargs={"path": str(llama_dir), "head": "lm", "num_labels": 3}))
    with pytest.raises(ModelError, match=r"cannot load an image classifier \(head='image'\) from .*tiny-llama"):
        load_model(ModelSpec(name="hf", kwargs={"path": str(llama_dir), "head": "image"}))
    with pytest.raises(ModelError, match="head must be one of 'classifier', 'embedding', 'lm', 'image'"):
        load_model(ModelSpec(name="hf", kwargs={"path": str(vit_dir), "head": "vision"}))
