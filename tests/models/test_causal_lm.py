"""The tiny Llama: grouped-query attention from a local config, causal, registered, trainable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from spiralkit.errors import ModelError
from spiralkit.models import ModelSpec, load_model
from spiralkit.models.causal_lm import CausalLM, tiny_llama
from spiralkit.spiral.recipe import load_recipe, parse_recipe
from spiralkit.spiral.runner import Spiral
from spiralkit.tasks import Perplexity
from spiralkit.train import OptimizerConfig, TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"hidden_size": 32, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate_size": 48, "vocab_size": 64}


def test_grouped_query_attention_has_fewer_key_value_heads() -> None:
    torch.manual_seed(0)
    model = tiny_llama(**SMALL)
    attention = model.llm.model.layers[0].self_attn
    assert attention.q_proj.out_features == 32  # 4 heads of 8
    assert attention.k_proj.out_features == attention.v_proj.out_features == 16  # 2 key/value heads of 8
    x = torch.randint(0, 64, (3, 10))
    assert model(x).shape == (3, 10, 64)


def test_it_is_causal_a_later_token_changes_no_earlier_logit() -> None:
    torch.manual_seed(0)
    model = tiny_llama(**SMALL).eval()
    x = torch.randint(0, 64, (1, 12))
    changed = x.clone()
    changed[0, 8] = (x[0, 8] + 1) % 64
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-4)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"heads": 4, "kv_heads": 3}, "heads 4 is not a multiple of kv_heads 3"),
    ({"hidden_size": 30, "heads": 4}, "hidden_size 30 is not a multiple of heads 4"),
    ({"layers": 0}, "layers must be >= 1, got 0"),
])
def test_sizes_that_do_not_fit_are_named(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ModelError, match=message):
        tiny_llama(**kwargs)


def test_a_few_steps_lower_the_next_token_loss() -> None:
    torch.manual_seed(0)
    model = tiny_llama(**SMALL)
    text = torch.arange(33) % 8  # a repeating pattern: easy to learn
    x, y = text[:-1].reshape(1, 32).repeat(4, 1), text[1:].reshape(1, 32).repeat(4, 1)
    task = Perplexity()
    with torch.no_grad():
        before = task.loss(model(x), y).item()
    train(model, [(x, y)] * 10, config=TrainConfig(epochs=1, optimizer=OptimizerConfig(name="adamw", lr=1e-2),
                                                     lr_schedule="constant"), objective=lambda m, a, b: task.loss(m(a), b),
          seed=0)
    with torch.no_grad():
        after = task.loss(model(x), y).item()
    assert after < 0.7 * before


def test_the_recipe_model_loads_with_its_data_and_task() -> None:
    recipe = load_recipe(ROOT / "recipes" / "tinyllama_tinystories.yaml")
    assert recipe.task == Perplexity()
    assert recipe.data.name == "tinystories"
    model = load_model(recipe.model)
    assert isinstance(model, CausalLM)
    config = model.llm.config
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.vocab_size == 256  # byte tokens
    seq_len = recipe.data.kwargs["seq_len"]
    with torch.no_grad():
        assert model(torch.randint(0, 256, (2, seq_len))).shape == (2, seq_len, 256)


def test_the_int4_recipe_quantizes_the_same_model_and_data() -> None:
    base = load_recipe(ROOT / "recipes" / "tinyllama_tinystories.yaml")
    int4 = load_recipe(ROOT / "recipes" / "tinyllama_tinystories_int4.yaml")
    assert int4.model.kwargs == base.model.kwargs and int4.data == base.data and int4.task == base.task
    assert int4.quantize is not None and int4.quantize.kind == "weight-only"
    assert (int4.quantize.bits, int4.quantize.group_size) == (4, 32)  # type: ignore[attr-defined]
    assert str(int4.model.checkpoint).endswith(f"{base.name}/model.safetensors")


def test_it_is_a_zoo_name() -> None:
    assert isinstance(load_model(ModelSpec(name="tiny_llama", kwargs=SMALL)), CausalLM)


SPIRAL = """\
name: llama_spiral
seed: 0
threads: 1
model: {name: tiny_llama, kwargs: {hidden_size: 32, layers: 1, heads: 4, kv_heads: 2, intermediate_size: 64}}
data: {name: tinystories, batch_size: 16, eval_batch_size: 64, kwargs: {seq_len: 64, limit_stories: 200}}
task: perplexity
train: {epochs: 1, max_batches: 5, optimizer: {name: adamw, lr: 3.0e-3}}
prune: {target_sparsity: 0.5, schedule: {kind: one-shot}}
recover: {kind: finetune, train: {epochs: 1, max_batches: 3, optimizer: {name: adamw, lr: 1.0e-3}}}
targets: {max_metric_drop: 1000.0}
measure: {repeats: 2, warmup: 0}
"""


@pytest.mark.slow  # a whole spiral on real stories: ~15 s of CPU
def test_the_spiral_prunes_every_linear_layer_of_the_llama_including_lm_head(tmp_path: Path) -> None:
    # Untied by default: a tied lm_head.weight is no parameter of its own, and its mask could not be applied.
    Spiral(parse_recipe(SPIRAL)).run(tmp_path / "run", console=Console(quiet=True))
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["task"] == {"metric": "perplexity", "higher_is_better": False}
    assert report["final"]["sparsity"] > 0.3 and report["final"]["metric"] > 1.0
