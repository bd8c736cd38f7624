"""Attention heads of the Hugging Face families: GPT-2, DistilBERT, T5, ViT/DeiT (5.x naming), Llama (GQA).

Every model is a tiny random one built from a transformers config class (nothing is
downloaded). Each family is pruned by half (heads and FFN) in remove mode and compared
with its masked twin; the ONNX exports are in the slow tests.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from spiralkit.graph import trace_groups
from spiralkit.models import ModelSpec, load_model
from spiralkit.prune.apply import apply_plan
from spiralkit.prune.saved import load_pruned, save_pruned
from spiralkit.prune.structured import StructuredPrune, plan_pruning, prune_structured
from tests.prune.test_structured import assert_twins

transformers = pytest.importorskip("transformers")


class Outputs(nn.Module):
    """A Hugging Face model as a one-input module returning its logits (or last hidden state)."""

    def __init__(self, model: nn.Module, key: str = "input_ids") -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(**{self.key: x})
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def tiny_llama(layers: int = 2, kv_heads: int = 2) -> Outputs:
    """Llama with 4 query heads over 2 key/value heads (grouped-query attention)."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return Outputs(transformers.LlamaForCausalLM(config).eval())


def tiny_decoder(family: str) -> Outputs:
    """Mistral, Qwen2 (q/k/v biases) or Qwen3 (per-head q/k norms), 4 query over 2 key/value heads."""
    config_class, model_class = {
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[family]
    config = config_class(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():  # random, not zero, biases: a bias that is cut wrongly shows
        for name, param in model.named_parameters():
            if name.endswith("_proj.bias"):
                param.normal_()
    return Outputs(model)


def tiny_gpt2() -> Outputs:
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                     bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return Outputs(transformers.GPT2LMHeadModel(config).eval())


def tiny_distilbert() -> Outputs:
    config = transformers.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                           max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    return Outputs(transformers.DistilBertForSequenceClassification(config).eval())


def tiny_vit() -> Outputs:
    config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    return Outputs(transformers.ViTForImageClassification(config).eval(), key="pixel_values")


def tiny_deit() -> Outputs:
    config = transformers.DeiTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    return Outputs(transformers.DeiTForImageClassification(config).eval(), key="pixel_values")


def tiny_t5(layers: int = 2) -> Outputs:
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=layers, num_heads=4)
    torch.manual_seed(0)
    return Outputs(transformers.T5EncoderModel(config).eval())


def tiny_clip_vision() -> Outputs:
    config = transformers.CLIPVisionConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    return Outputs(transformers.CLIPVisionModel(config).eval(), key="pixel_values")


def tiny_bart() -> Outputs:
    """BART encoder-decoder (self- and cross-attention); its decoder input is the shifted input."""
    config = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=32)
    torch.manual_seed(0)
    return Outputs(transformers.BartModel(config).eval())


def _tokens() -> Tensor:
    return torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def _pixels() -> Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


# family → (builder, input, adapter kind, attention module of layer 0, query heads attribute or None, FFN root of layer 0)
FAMILIES: dict[str, tuple[Callable[[], Outputs], Callable[[], Tensor], str, str, str | None, str]] = {
    "gpt2": (tiny_gpt2, _tokens, "hf_gpt2", "model.transformer.h.0.attn", "num_heads",
             "model.transformer.h.0.mlp.c_fc"),
    "distilbert": (tiny_distilbert, _tokens, "hf_distilbert", "model.distilbert.transformer.layer.0.attention",
                   "n_heads", "model.distilbert.transformer.layer.0.ffn.lin1"),
    "vit": (tiny_vit, _pixels, "hf_qkvo", "model.vit.layers.0.attention", "num_attention_heads",
            "model.vit.layers.0.mlp.fc1"),
    "deit": (tiny_deit, _pixels, "hf_qkvo", "model.deit.layers.0.attention", "num_attention_heads",
             "model.deit.layers.0.mlp.fc1"),
    "t5": (tiny_t5, _tokens, "hf_t5", "model.encoder.block.0.layer.0.SelfAttention", "n_heads",
           "model.encoder.block.0.layer.1.DenseReluDense.wi"),
    "llama": (tiny_llama, _tokens, "hf_qkvo", "model.model.layers.0.self_attn", None,
              "model.model.layers.0.mlp.gate_proj"),
    "clip-vision": (tiny_clip_vision, _pixels, "hf_qkv_out", "model.encoder.layers.0.self_attn",
                    "num_heads", "model.encoder.layers.0.mlp.fc1"),
    "bart": (tiny_bart, _tokens, "hf_qkv_out", "model.encoder.layers.0.self_attn", "num_heads",
             "model.encoder.layers.0.fc1"),
    **{family: (functools.partial(tiny_decoder, family), _tokens, "hf_qkvo", "model.model.layers.0.self_attn", None,
                "model.model.layers.0.mlp.gate_proj") for family in ("mistral", "qwen2", "qwen3")},
}


def _prune_half(family: str) -> tuple[Outputs, Outputs, Tensor]:
    build, inputs, kind, attention, count, ffn = FAMILIES[family]
    model, x = build(), inputs()
    plan = plan_pruning(model, StructuredPrune(ratio=0.5), example=x[:1])
    assert len(plan.heads) == (3 if family == "bart" else 2) and all(h.kind == kind for h in plan.heads)
    assert all(len(h.keep) == h.num_heads // 2 for h in plan.heads)
    assert ffn in {g.id for g in plan.groups}
    masked = apply_plan(copy.deepcopy(model), plan, mode="mask")
    before = sum(p.numel() for p in model.parameters())
    apply_plan(model, plan, mode="remove")
    assert sum(p.numel() for p in model.parameters()) < before
    module = model.get_submodule(attention)
    if count is not None:
        assert getattr(module, count) == 2
    assert model.get_submodule(ffn).weight.numel() == masked.get_submodule(ffn).weight.numel() // 2
    return model, masked, x


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_loses_half_its_heads_and_ffn_and_matches_its_masked_twin(family: str) -> None:
    torch.set_num_threads(1)
    model, masked, x = _prune_half(family)
    assert_twins(model, masked, x)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3", "t5", "vit", "distilbert", "clip-vision", "bart"])
def test_each_pruned_family_exports_to_onnx(family: str, tmp_path: Path) -> None:
    from spiralkit.export.onnx import export_onnx, verify_onnx

    torch.set_num_threads(1)
    model, _, x = _prune_half(family)
    path = export_onnx(model, x, tmp_path / f"{family}.onnx")
    verify_onnx(model, path, x, atol=1e-4, rtol=1e-3)


def test_gpt2_conv1d_layers_are_groups_and_its_fused_attention_loses_whole_heads() -> None:
    model, x = tiny_gpt2(), _tokens()
    groups = trace_groups(model, x[:1])
    assert {g.id for g in groups.channels} == {"model.transformer.h.0.mlp.c_fc", "model.transformer.h.1.mlp.c_fc"}
    skipped = {s.name: s.reason for s in groups.skipped}
    assert "LayerNorm 'model.transformer.h.1.ln_1'" in skipped["model.transformer.h.0.mlp.c_proj"]
    plan = plan_pruning(model, StructuredPrune(ratio=0.5), example=x[:1])
    apply_plan(model, plan, mode="remove")
    attention = model.model.transformer.h[0].attn
    kept = plan.heads[0].keep
    assert attention.c_attn.weight.shape == (32, 48) and attention.c_attn.nf == 48 and attention.split_size == 16
    assert attention.c_proj.weight.shape == (16, 32) and attention.c_proj.nx == 16
    assert len(kept) == 2 and model.model.transformer.h[0].mlp.c_fc.nf == 64


def _spread(model: nn.Module) -> nn.Module:
    """Larger random matrices than Hugging Face's init, so that greedy decoding does not repeat one token."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.dim() == 2:
                param.normal_(0, 0.2)
    return model


def _greedy_by_full_forward(model: nn.Module, ids: Tensor, steps: int) -> Tensor:
    """Greedy decoding that recomputes the whole sequence at every step (no cache)."""
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def _generate(model: nn.Module, ids: Tensor, steps: int) -> Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                              do_sample=False, use_cache=True, pad_token_id=0)


@pytest.mark.parametrize("exclude", [(), ("model.model.layers.1.*",)])
def test_llama_grouped_query_attention_loses_a_kv_head_with_its_queries_and_generates_as_the_full_forward(
        exclude: tuple[str, ...]) -> None:
    torch.set_num_threads(1)
    wrapper = _spread(tiny_llama())
    ids = _tokens()[:, :5]
    plan = plan_pruning(wrapper, StructuredPrune(ratio=0.5, exclude=exclude), example=ids[:1])
    assert [(h.module, h.num_heads, len(h.keep)) for h in plan.heads] == [
        (f"model.model.layers.{i}.self_attn", 2, 1) for i in range(2 - len(exclude))]
    apply_plan(wrapper, plan, mode="remove")
    lm = wrapper.model
    attention = lm.model.layers[0].self_attn
    assert attention.q_proj.out_features == 16 and attention.k_proj.out_features == 8
    assert attention.v_proj.out_features == 8 and attention.o_proj.in_features == 16
    assert attention.num_key_value_groups == 2
    assert lm.model.layers[1].self_attn.q_proj.out_features == (32 if exclude else 16)
    generated = _generate(lm, ids, 6)
    assert generated.shape == (2, 11) and len(set(generated[:, 5:].flatten().tolist())) > 1
    assert torch.equal(generated, _greedy_by_full_forward(lm, ids, 6))


def test_a_pruned_llama_saves_its_per_layer_heads_and_load_pruned_replays_them(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    spec = ModelSpec(name="tests.prune.test_hf_heads:tiny_llama")
    model = load_model(spec)
    ids = _tokens()[:, :5]
    plan = prune_structured(model, StructuredPrune(ratio=0.5, exclude=("model.model.layers.1.self_attn",)),
                            example=ids[:1])
    assert [h.module for h in plan.heads] == ["model.model.layers.0.self_attn"]
    save_pruned(model, plan, tmp_path, spec=spec)
    loaded = load_pruned(tmp_path)
    layers = loaded.model.model.layers
    assert (layers[0].self_attn.k_proj.out_features, layers[1].self_attn.k_proj.out_features) == (8, 16)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert torch.equal(_generate(loaded.model, ids, 4), _generate(model.model, ids, 4))


def test_t5_layers_keep_their_own_heads_of_the_shared_position_bias() -> None:
    torch.set_num_threads(1)
    model, x = tiny_t5(), _tokens()
    plan = plan_pruning(model, StructuredPrune(ratio=0.5), example=x[:1])
    keeps = [h.keep for h in plan.heads]
    masked = apply_plan(copy.deepcopy(model), plan, mode="mask")
    apply_plan(model, plan, mode="remove")
    blocks = model.model.encoder.block
    assert [b.layer[0].SelfAttention.spiralkit_heads.tolist() for b in blocks] == [list(k) for k in keeps]
    # the first layer's bias table stays whole: the later layers take their heads from it
    assert blocks[0].layer[0].SelfAttention.relative_attention_bias.weight.shape[1] == 4
    assert_twins(model, masked, x)
    again = plan_pruning(model, StructuredPrune(ratio=0.5), example=x[:1])
    apply_plan(model, again, mode="remove")
    first = blocks[0].layer[0].SelfAttention.spiralkit_heads.tolist()
    assert len(first) == 1 and first[0] in keeps[0]


@pytest.mark.slow
def test_an_unpruned_t5_encoder_exports_with_eager_attention_and_keeps_sdpa(tmp_path: Path) -> None:
    from spiralkit.export.onnx import export_onnx, verify_onnx

    torch.set_num_threads(1)
    model, x = tiny_t5(layers=1), _tokens()  # one layer: the export fails with SDPA first, then runs again
    assert model.model.config._attn_implementation == "sdpa"
    path = export_onnx(model, x, tmp_path / "t5.onnx")
    verify_onnx(model, path, x, atol=1e-4, rtol=1e-3)
    assert model.model.config._attn_implementation == "sdpa"


class FusedAttention(nn.Module):
    """An attention layout no adapter knows: one fused qkv projection, heads split by a view."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, 4, 4).permute(2, 0, 3, 1, 4)
        context = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(context.transpose(1, 2).reshape(batch, length, 16))


class _WithFused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.attn, self.out = nn.Linear(8, 16), FusedAttention(), nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.attn(self.inp(x)).mean(1))


def test_an_attention_layout_without_adapter_is_reported_as_such() -> None:
    groups = trace_groups(_WithFused().eval(), torch.randn(1, 5, 8))
    skipped = {s.name: s.reason for s in groups.skipped}
    assert skipped["attn"].startswith("FusedAttention 'attn': this attention layout has no head adapter (known layouts: ")
    assert "hf_qkvo" in skipped["attn"]
    assert skipped["attn.qkv"].startswith("is inside FusedAttention 'attn', an attention layout with no head adapter")
    assert not groups.heads


class _BadWidths(nn.Module):
    """q/k/v/o_proj naming whose widths do not form heads of ``head_dim``."""

    def __init__(self) -> None:
        super().__init__()
        self.head_dim = 8
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 12), nn.Linear(16, 12)
        self.o_proj = nn.Linear(16, 16)

    def forward(self, x: Tensor) -> Tensor:
        return self.o_proj(self.q_proj(x)) + self.k_proj(x).sum(-1, keepdim=True) + self.v_proj(x).sum(-1, keepdim=True)


def test_an_inconsistent_projection_layout_is_reported_with_its_widths() -> None:
    groups = trace_groups(nn.Sequential(_BadWidths()).eval(), torch.randn(1, 3, 16))
    skipped = {s.name: s.reason for s in groups.skipped}
    assert skipped["0"] == ("_BadWidths: projection widths 16/12 are not multiples of head_dim=8 (layout 'hf_qkvo')")
    assert not groups.heads


def test_a_pruned_t5_seq2seq_generates_with_its_caches_as_the_full_forward() -> None:
    torch.set_num_threads(1)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger random weights than T5's init, so that greedy decoding varies
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.3)
    ids = _tokens()[:, :7]
    example = {"input_ids": ids[:1], "decoder_input_ids": torch.zeros(1, 3, dtype=torch.long)}
    plan = plan_pruning(model, StructuredPrune(ratio=0.5), example=example)
    assert len(plan.heads) == 6 and sum("EncDecAttention" in h.module for h in plan.heads) == 2
    apply_plan(model, plan, mode="remove")
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        decoded = torch.zeros(2, 1, dtype=torch.long)
        for _ in range(5):
            logits = model(input_ids=ids, decoder_input_ids=decoded, use_cache=False).logits
            decoded = torch.cat([decoded, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert len(set(decoded[:, 1:].flatten().tolist())) > 1  # not a constant sequence
    assert torch.equal(generated, decoded)


def test_gpt2_cross_attention_is_reported_with_its_reason() -> None:
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32,
                                     add_cross_attention=True, bos_token_id=1, eos_token_id=2)
    model = Outputs(transformers.GPT2LMHeadModel(config).eval())
    groups = trace_groups(model, _tokens()[:1])
    skipped = {s.name: s.reason for s in groups.skipped}
    assert skipped["model.transformer.h.0.crossattention"] == (
        "GPT2Attention is cross-attention (separate q_attn), which layout 'hf_gpt2' does not cover")
    assert [h.module for h in groups.heads] == ["model.transformer.h.0.attn"]


@pytest.mark.parametrize("family", ["gpt2", "mistral", "qwen2", "qwen3"])
def test_other_pruned_decoders_generate_as_their_full_forward(family: str) -> None:
    torch.set_num_threads(1)
    wrapper = _spread(FAMILIES[family][0]())
    ids = _tokens()[:, :5]
    plan = plan_pruning(wrapper, StructuredPrune(ratio=0.5), example=ids[:1])
    apply_plan(wrapper, plan, mode="remove")
    generated = _generate(wrapper.model, ids, 6)
    assert len(set(generated[:, 5:].flatten().tolist())) > 1
    assert torch.equal(generated, _greedy_by_full_forward(wrapper.model, ids, 6))


def test_multi_query_attention_loses_query_heads_and_keeps_its_one_kv_head() -> None:
    torch.set_num_threads(1)
    wrapper = _spread(tiny_llama(kv_heads=1))
    ids = _tokens()[:, :5]
    plan = plan_pruning(wrapper, StructuredPrune(ratio=0.5), example=ids[:1])
    assert [(h.num_heads, len(h.keep)) for h in plan.heads] == [(4, 2), (4, 2)]
    masked = apply_plan(copy.deepcopy(wrapper), plan, mode="mask")
    apply_plan(wrapper, plan, mode="remove")
    attention = wrapper.model.model.layers[0].self_attn
    assert attention.q_proj.out_features == 16 and attention.o_proj.in_features == 16
    assert attention.k_proj.out_features == 8 and attention.num_key_value_groups == 2
    assert_twins(wrapper, masked, ids)
    generated = _generate(wrapper.model, ids, 6)
    assert len(set(generated[:, 5:].flatten().tolist())) > 1
    assert torch.equal(generated, _greedy_by_full_forward(wrapper.model, ids, 6))
