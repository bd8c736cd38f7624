"""Benchmark: half the attention heads and FFN neurons of each Hugging Face family, removed.

    python -m bench.hf_heads [--families gpt2,llama,...] [--no-onnx]

For each family a small random model is built from its transformers config class (nothing is
downloaded; 4 layers — BART 2 encoder + 2 decoder —, hidden 128, 8 query heads — Llama/Mistral/Qwen with 4 key/value heads —,
FFN 512, sequence 32 or 32x32 images). `plan_pruning(StructuredPrune(ratio=0.5))` (L2
magnitude, layer-wise) plans the heads and the FFN channel groups; the plan is applied in
remove mode and in mask mode to copies. Printed per family, as one Markdown table row:

* the adapter kind, heads per layer before → after (key/value heads with grouped-query
  attention, each with its query heads), the FFN width of layer 0 before → after;
* MACs of one example (`spiralkit.measure.count_macs`, batch 1) dense and pruned, and their
  ratio;
* the twin error: ``max |removed(x) − masked(x)|`` over a batch of 4, relative to
  ``max |masked(x)|``;
* the ONNX error: ``max |onnx(x) − removed(x)|`` of the exported pruned model in ONNX Runtime
  (`spiralkit.export.onnx.verify_onnx`), relative likewise.

This is a script, not a test; with ONNX export it takes a few minutes on a quiet CPU.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from spiralkit.export.onnx import export_onnx, verify_onnx
from spiralkit.measure import count_macs
from spiralkit.prune.apply import apply_plan
from spiralkit.prune.structured import StructuredPrune, plan_pruning

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, VOCAB, SEQ, IMAGE = 128, 4, 8, 4, 512, 256, 32, 32


class Outputs(nn.Module):
    """A Hugging Face model as a one-input module returning its logits (or last hidden state)."""

    def __init__(self, model: nn.Module, key: str = "input_ids") -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(**{self.key: x})
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _decoder(config_name: str, model_name: str) -> Callable[[], Outputs]:
    def build() -> Outputs:
        import transformers

        config = getattr(transformers, config_name)(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS,
            max_position_embeddings=2 * SEQ)
        return Outputs(getattr(transformers, model_name)(config))

    return build


def _gpt2() -> Outputs:
    import transformers

    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN,
                                     n_positions=2 * SEQ, bos_token_id=0, eos_token_id=0)
    return Outputs(transformers.GPT2LMHeadModel(config))


def _distilbert() -> Outputs:
    import transformers

    config = transformers.DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS,
                                           hidden_dim=FFN, max_position_embeddings=2 * SEQ, num_labels=3)
    return Outputs(transformers.DistilBertForSequenceClassification(config))


def _t5() -> Outputs:
    import transformers

    config = transformers.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=FFN,
                                   num_layers=LAYERS, num_heads=HEADS)
    return Outputs(transformers.T5EncoderModel(config))


def _vision(kind: str) -> Callable[[], Outputs]:
    def build() -> Outputs:
        import transformers

        config = getattr(transformers, f"{kind}Config")(
            image_size=IMAGE, patch_size=4, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, intermediate_size=FFN, num_labels=10)
        return Outputs(getattr(transformers, f"{kind}ForImageClassification")(config), key="pixel_values")

    return build


def _clip_vision() -> Outputs:
    import transformers

    config = transformers.CLIPVisionConfig(image_size=IMAGE, patch_size=4, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                           num_attention_heads=HEADS, intermediate_size=FFN)
    return Outputs(transformers.CLIPVisionModel(config), key="pixel_values")


def _bart() -> Outputs:
    import transformers

    config = transformers.BartConfig(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS // 2,
                                     decoder_layers=LAYERS // 2, encoder_attention_heads=HEADS,
                                     decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
                                     max_position_embeddings=2 * SEQ)
    return Outputs(transformers.BartModel(config))


def _tokens(batch: int) -> Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(0))


def _pixels(batch: int) -> Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))


FAMILIES: dict[str, tuple[Callable[[], Outputs], Callable[[int], Tensor]]] = {
    "gpt2": (_gpt2, _tokens),
    "distilbert": (_distilbert, _tokens),
    "t5-encoder": (_t5, _tokens),
    "vit": (_vision("ViT"), _pixels),
    "deit": (_vision("DeiT"), _pixels),
    "llama": (_decoder("LlamaConfig", "LlamaForCausalLM"), _tokens),
    "mistral": (_decoder("MistralConfig", "MistralForCausalLM"), _tokens),
    "qwen2": (_decoder("Qwen2Config", "Qwen2ForCausalLM"), _tokens),
    "qwen3": (_decoder("Qwen3Config", "Qwen3ForCausalLM"), _tokens),
    "clip-vision": (_clip_vision, _pixels),
    "bart": (_bart, _tokens),
}


def row(family: str, *, onnx: bool, directory: Path) -> str:
    """One Markdown table row for ``family`` (see the module docstring)."""
    build, inputs = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    x, one = inputs(4), inputs(1)
    dense_macs = count_macs(model, one)
    plan = plan_pruning(model, StructuredPrune(ratio=0.5), example=one)
    masked = apply_plan(copy.deepcopy(model), plan, mode="mask")
    apply_plan(model, plan, mode="remove")
    pruned_macs = count_macs(model, one)
    with torch.no_grad():
        reference, removed = masked(x), model(x)
    scale = float(reference.abs().max())
    twin = float((removed - reference).abs().max()) / scale
    onnx_error = "—"
    if onnx:
        path = export_onnx(model, x, directory / f"{family}.onnx")
        onnx_error = f"{verify_onnx(model, path, x, atol=1.0, rtol=1.0).max_abs_diff / scale:.1e}"
    heads = plan.heads[0]
    group = plan.groups[0]
    return (f"| {family} | {heads.kind} | {heads.num_heads} → {len(heads.keep)} | {group.size} → {len(group.keep)} "
            f"| {dense_macs / 1e6:.2f} M | {pruned_macs / 1e6:.2f} M | {pruned_macs / dense_macs:.3f} "
            f"| {twin:.1e} | {onnx_error} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated, from: " + ", ".join(FAMILIES))
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX export and its error")
    args = parser.parse_args()
    torch.set_num_threads(1)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    print("| family | adapter | heads (layer 0) | FFN (layer 0) | MACs dense | MACs pruned | ratio "
          "| twin error (rel.) | ONNX error (rel.) |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            print(row(family, onnx=not args.no_onnx, directory=Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
