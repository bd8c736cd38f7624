"""A tiny Llama causal language model built from a local config, as a one-input spiralkit model.

`tiny_llama` builds Hugging Face's ``LlamaForCausalLM`` from a ``LlamaConfig`` written here
(nothing is downloaded; the weights start random and are trained by a recipe, e.g.
``recipes/tinyllama_tinystories.yaml``), with grouped-query attention: ``kv_heads`` key/value
heads shared by ``heads`` query heads (Ainslie et al. 2023), RMSNorm, SwiGLU MLPs and rotary
position embeddings as in Llama (Touvron et al. 2023).

**Input convention.** A `CausalLM` takes one LongTensor of token ids ``(batch, seq)`` (no
padding, no attention mask: the data gives full windows, see `spiralkit.data.tinystories`)
and returns next-token logits ``(batch, seq, vocab_size)``; the `spiralkit.tasks.Perplexity`
task scores them. The Hugging Face model is the ``llm`` attribute, so layer ``i``'s linear
layers are ``llm.model.layers.i.self_attn.{q,k,v,o}_proj`` and
``llm.model.layers.i.mlp.{gate,up,down}_proj``, and the output layer is ``llm.lm_head``.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from spiralkit.errors import ModelError

__all__ = ["CausalLM", "tiny_llama"]

Attention = Literal["sdpa", "eager"]


class CausalLM(nn.Module):
    """A Hugging Face causal LM with spiralkit's one-tensor interface: token ids in, logits out.

    Args:
        llm: A ``*ForCausalLM`` model.
    """

    def __init__(self, llm: nn.Module) -> None:
        super().__init__()
        self.llm = llm

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(batch, seq, vocab)`` of the next token at every position of ``x`` ``(batch, seq)``."""
        return self.llm(input_ids=x, use_cache=False).logits


def tiny_llama(
    *,
    vocab_size: int = 256,
    hidden_size: int = 128,
    layers: int = 3,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 384,
    max_positions: int = 512,
    rope_theta: float = 10_000.0,
    tie_embeddings: bool = False,
    attention: Attention = "sdpa",
) -> CausalLM:
    """A small ``LlamaForCausalLM`` with grouped-query attention, randomly initialised.

    Args:
        vocab_size: Tokens (256: the bytes of `spiralkit.data.tinystories`).
        hidden_size: Width of the residual stream; a multiple of ``heads``.
        layers: Decoder layers.
        heads: Query heads.
        kv_heads: Key/value heads; divides ``heads`` (``heads``: plain multi-head attention).
        intermediate_size: Width of the SwiGLU MLP.
        max_positions: Longest sequence the rotary embedding is set up for.
        rope_theta: Rotary embedding base.
        tie_embeddings: Share the input embedding with the output layer's weight. Off by
            default: a tied ``lm_head.weight`` is not a parameter of its own
            (``named_parameters`` lists the shared tensor once, as the embedding), so
            per-layer pruning masks and quantization of ``lm_head`` could not name it.
        attention: ``"sdpa"`` (fast) or ``"eager"`` (the attention probabilities can be captured).

    Raises:
        ModelError: Sizes that do not fit together (``hidden_size % heads``, ``heads % kv_heads``).
    """
    for key, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size), ("layers", layers),
                       ("heads", heads), ("kv_heads", kv_heads), ("intermediate_size", intermediate_size),
                       ("max_positions", max_positions)):
        if value < 1:
            raise ModelError(f"tiny_llama: {key} must be >= 1, got {value}")
    if hidden_size % heads:
        raise ModelError(f"tiny_llama: hidden_size {hidden_size} is not a multiple of heads {heads}")
    if heads % kv_heads:
        raise ModelError(f"tiny_llama: heads {heads} is not a multiple of kv_heads {kv_heads} "
                         "(each key/value head serves the same number of query heads)")
    from transformers import LlamaConfig, LlamaForCausalLM  # deferred: importing transformers takes seconds

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rope_theta=rope_theta,
        tie_word_embeddings=tie_embeddings,
        attention_dropout=0.0,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    config._attn_implementation = attention
    return CausalLM(LlamaForCausalLM(config))
