"""Attention heads as prunable units: find them, score their weights, zero or remove them.

A head cannot be cut like a channel. Its query, key and value rows and its columns of the
output projection go together, and the module's forward pass reshapes by the number of heads,
so that number (and sometimes the forward pass itself) must change with the weights. Each
supported attention layout has a small adapter here (an explicit tuple, `ADAPTERS`; nothing
registers itself on import):

* ``torch_mha`` — ``torch.nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer``
  and torchvision's ViT). With fewer heads its inner width ``heads · head_dim`` no longer
  equals ``embed_dim``, which torch's own forward assumes, so a pruned layer becomes a
  `HeadPrunedMultiheadAttention`: the same parameters (same state-dict keys) with a forward
  pass that does not tie the two widths.
* ``hf_bert`` — Hugging Face BERT-style ``XAttention`` modules (``.self.query/key/value`` and
  ``.output.dense``); their forward pass infers the head count from the shapes, and the
  ``num_attention_heads``/``all_head_size`` attributes are patched.
* ``swin`` — torchvision's ``ShiftedWindowAttention`` (v1 and v2): the relative position bias
  table (v1), the continuous position bias MLP and logit scale (v2) are cut by head too.
* ``maxvit`` — torchvision's ``RelativePositionalMultiHeadAttention``.
* ``hf_gpt2`` — GPT-2's ``GPT2Attention``: one fused ``c_attn`` and ``c_proj``, both
  Hugging Face ``Conv1D`` (weight stored ``(in, out)``); ``num_heads``/``split_size`` patched.
* ``hf_t5`` — T5's ``T5Attention``; the relative position bias is shared by the layers of a
  stack, so it stays whole and each pruned layer picks its kept heads from it.
* ``hf_qkvo``, ``hf_qkv_out`` and ``hf_distilbert`` — separate q/k/v/output projections,
  described as data (`ProjectionLayout`, one line per family in `HF_LAYOUTS`):
  transformers 5.x's ``q_proj/k_proj/v_proj/o_proj`` (Llama, Mistral, Qwen2/3, ViT, DeiT,
  ...), ``q_proj/k_proj/v_proj/out_proj`` (CLIP, BART, ...) and DistilBERT's
  ``q_lin/k_lin/v_lin/out_lin``. Their forward passes infer the head count from the
  projection widths (the count attributes are patched too). With grouped-query attention a unit is one key/value head together
  with its query heads (see `_HFProjections`), so ``num_key_value_groups`` is unchanged.
* ``timm_*`` — timm's layouts (ViT/DeiT, rotary with grouped-query, Swin, BEiT, LeViT, EVA), in `spiralkit.graph.attention_timm`.

Hugging Face configs hold one head count for all layers; pruned layers may differ, so the
config is left as it was and the per-layer counts live in the modules (the projections'
shapes): a saved plan lists the kept heads of each layer and `load_pruned` replays it on the
model built from the original config. Decoding with the KV cache then works unchanged (the
cache takes each layer's key/value shapes as they come).

A module that looks like attention (a class name with "Attention", two or more linear
layers) but that no adapter matches is reported by `unknown_attention`, so that the traced
groups can say "this attention layout has no head adapter" rather than name the reshape
that stopped them.

Masking a head zeroes exactly the entries that removing it deletes, so a masked model and
its physically pruned twin compute the same function (see ``tests/prune``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spiralkit.graph.layers import is_conv1d

__all__ = [
    "ADAPTERS",
    "HeadAdapter",
    "HeadGroup",
    "HeadPrunedMultiheadAttention",
    "HeadSlice",
    "ProjectionLayout",
    "adapter_for",
    "find_attention",
    "head_slices",
    "known_layouts",
    "mask_heads",
    "remove_heads",
    "unknown_attention",
]


@dataclass(frozen=True)
class HeadGroup:
    """One attention layer whose heads can be pruned.

    Attributes:
        module: Dotted name of the attention module (the one holding all projections).
        kind: Adapter name (``torch_mha``, ``hf_bert``, ``swin``, ``maxvit``, ``hf_gpt2``, ...).
        num_heads: Number of heads (with grouped-query attention: of key/value heads, each
            pruned together with its query heads; with a single key/value head: of query heads).
        head_dim: Width of one head.
    """

    module: str
    kind: str
    num_heads: int
    head_dim: int


@dataclass(frozen=True)
class HeadSlice:
    """Where one parameter holds the entries of each head.

    Head ``h`` owns ``param.index_select(dim, index[:, h, :].flatten())``. The leading
    axis of ``index`` lists segments (e.g. the q, k and v blocks of a packed projection), so
    that ``index[:, kept, :].flatten()`` keeps each segment contiguous after removal.

    Attributes:
        path: Parameter path relative to the attention module (e.g. ``"out_proj.weight"``).
        dim: The parameter dimension indexed by heads.
        index: ``(segments, num_heads, width)`` long tensor.
        weight: Whether this is a projection weight matrix (what magnitude criteria score).
    """

    path: str
    dim: int
    index: Tensor
    weight: bool


def _blocks(segments: int, heads: int, width: int) -> Tensor:
    """``(segments, heads, width)`` indices of ``segments`` back-to-back blocks of heads."""
    return torch.arange(segments * heads * width).view(segments, heads, width)


class HeadAdapter:
    """How one attention layout exposes its heads (see the module docstring).

    Subclasses implement `matches`, `unsupported`, `heads`, `slices` and `finish`.
    """

    kind: str = ""

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` has this adapter's layout."""
        raise NotImplementedError

    def unsupported(self, module: nn.Module) -> str | None:
        """Why this instance's heads cannot be pruned, or None."""
        return None

    def heads(self, module: nn.Module) -> tuple[int, int]:
        """``(num_heads, head_dim)``."""
        raise NotImplementedError

    def slices(self, module: nn.Module) -> list[HeadSlice]:
        """Every parameter entry that belongs to a head."""
        raise NotImplementedError

    def finish(self, module: nn.Module, num_heads: int) -> None:
        """Patch attributes (and the forward pass) after heads were removed."""
        raise NotImplementedError

    def record(self, module: nn.Module, kept: Tensor) -> None:
        """Note which heads (indices before removal) a removal keeps; called before `finish`."""

    def opaque(self, module: nn.Module) -> nn.Module | None:
        """The submodule whose forward mixes heads (kept whole in channel groups); None: traced as usual."""
        return module


# --------------------------------------------------------------------------- torch MHA


class HeadPrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose inner width ``num_heads · head_dim`` may differ from ``embed_dim``.

    Made by `remove_heads` by switching the class of a pruned layer: parameters, names and
    the call signature stay those of ``nn.MultiheadAttention``. ``_qkv_same_embed_dim`` is
    False so that ``nn.TransformerEncoderLayer`` never sends it to torch's fused fast path,
    which assumes the unpruned shapes. Attention is scaled by ``head_dim ** -0.5`` as before.
    """

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Same arguments and results as ``nn.MultiheadAttention.forward``."""
        batched = query.dim() == 3
        if not batched:  # (L, E) -> (L, 1, E)
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif self.batch_first:  # (B, L, E) -> (L, B, E), torch MHA's native layout
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        out, weights = self._attend(query, key, value, key_padding_mask, need_weights, attn_mask,
                                    average_attn_weights, is_causal)
        if not batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _projections(self) -> tuple[Tensor, Tensor, Tensor]:
        inner = self.num_heads * self.head_dim
        if self.in_proj_weight is not None:
            w_q, w_k, w_v = self.in_proj_weight.split(inner)
            return w_q, w_k, w_v
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight  # type: ignore[return-value]

    def _attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        need_weights: bool,
        attn_mask: Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
    ) -> tuple[Tensor, Tensor | None]:
        length, batch, _ = query.shape
        source = key.shape[0]
        heads, width = self.num_heads, self.head_dim
        w_q, w_k, w_v = self._projections()
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.split(heads * width)

        def split(x: Tensor, w: Tensor, b: Tensor | None, n: int) -> Tensor:
            return F.linear(x, w, b).view(n, batch, heads, width).permute(1, 2, 0, 3)  # (B, H, n, D)

        q, k, v = split(query, w_q, b_q, length), split(key, w_k, b_k, source), split(value, w_v, b_v, source)
        mask = _additive_mask(attn_mask, key_padding_mask, batch=batch, heads=heads, length=length,
                              source=source, dtype=q.dtype, is_causal=is_causal)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) * width**-0.5
            if mask is not None:
                scores = scores + mask
            probabilities = scores.softmax(dim=-1)
            context = F.dropout(probabilities, p=dropout, training=self.training) @ v
            weights = probabilities.mean(dim=1) if average_attn_weights else probabilities
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        context = context.permute(2, 0, 1, 3).reshape(length, batch, heads * width)
        return self.out_proj(context), weights


def _additive_mask(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    *,
    batch: int,
    heads: int,
    length: int,
    source: int,
    dtype: torch.dtype,
    is_causal: bool,
) -> Tensor | None:
    """torch MHA's masks (bool: True = blocked; float: added) as one additive ``(B|1, H|1, L, S)`` mask."""

    def additive(mask: Tensor) -> Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    total: Tensor | None = None
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(length, source, dtype=torch.bool).triu(1)
    if attn_mask is not None:
        if attn_mask.dim() == 3:
            if attn_mask.shape[0] != batch * heads:
                raise ValueError(
                    f"a per-head attn_mask of shape {tuple(attn_mask.shape)} does not fit a layer "
                    f"pruned to {heads} heads (expected first dimension {batch * heads})"
                )
            total = additive(attn_mask).view(batch, heads, length, source)
        else:
            total = additive(attn_mask).view(1, 1, length, source)
    if key_padding_mask is not None:
        padding = additive(key_padding_mask).view(batch, 1, 1, source)
        total = padding if total is None else total + padding
    return total


class _TorchMHA(HeadAdapter):
    kind = "torch_mha"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    def unsupported(self, module: nn.Module) -> str | None:
        if module.bias_k is not None or module.add_zero_attn:  # type: ignore[union-attr]
            return "nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported"
        return None

    def heads(self, module: nn.Module) -> tuple[int, int]:
        return int(module.num_heads), int(module.head_dim)  # type: ignore[arg-type]

    def slices(self, module: nn.Module) -> list[HeadSlice]:
        heads, width = self.heads(module)
        slices = [HeadSlice("out_proj.weight", 1, _blocks(1, heads, width), weight=True)]
        if module.in_proj_weight is not None:
            slices.append(HeadSlice("in_proj_weight", 0, _blocks(3, heads, width), weight=True))
        else:
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                slices.append(HeadSlice(name, 0, _blocks(1, heads, width), weight=True))
        if module.in_proj_bias is not None:
            slices.append(HeadSlice("in_proj_bias", 0, _blocks(3, heads, width), weight=False))
        return slices

    def finish(self, module: nn.Module, num_heads: int) -> None:
        module.num_heads = num_heads
        module._qkv_same_embed_dim = False
        _refresh_linear(module.out_proj)
        module.__class__ = HeadPrunedMultiheadAttention


# --------------------------------------------------------------------------- Hugging Face BERT


class _HFBert(HeadAdapter):
    """``XAttention`` with ``.self.{query,key,value}`` and ``.output.dense`` (BERT, RoBERTa, ...)."""

    kind = "hf_bert"

    def matches(self, module: nn.Module) -> bool:
        inner = getattr(module, "self", None)
        output = getattr(module, "output", None)
        return (
            isinstance(inner, nn.Module)
            and all(isinstance(getattr(inner, n, None), nn.Linear) for n in ("query", "key", "value"))
            and hasattr(inner, "num_attention_heads")
            and hasattr(inner, "attention_head_size")
            and isinstance(getattr(output, "dense", None), nn.Linear)
        )

    def heads(self, module: nn.Module) -> tuple[int, int]:
        return int(module.self.num_attention_heads), int(module.self.attention_head_size)  # type: ignore[union-attr]

    def slices(self, module: nn.Module) -> list[HeadSlice]:
        heads, width = self.heads(module)
        block = _blocks(1, heads, width)
        slices = [HeadSlice("output.dense.weight", 1, block, weight=True)]
        for name in ("query", "key", "value"):
            slices.append(HeadSlice(f"self.{name}.weight", 0, block, weight=True))
            if getattr(module.self, name).bias is not None:  # type: ignore[union-attr]
                slices.append(HeadSlice(f"self.{name}.bias", 0, block, weight=False))
        return slices

    def finish(self, module: nn.Module, num_heads: int) -> None:
        inner = module.self  # type: ignore[union-attr]
        inner.num_attention_heads = num_heads
        inner.all_head_size = num_heads * inner.attention_head_size
        for name in ("query", "key", "value"):
            _refresh_linear(getattr(inner, name))
        _refresh_linear(module.output.dense)  # type: ignore[union-attr]

    def opaque(self, module: nn.Module) -> nn.Module:
        return module.self  # type: ignore[return-value]


# --------------------------------------------------------------------------- torchvision Swin


def _swin_classes() -> tuple[type[nn.Module], ...]:
    try:
        from torchvision.models.swin_transformer import ShiftedWindowAttention
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return ()
    return (ShiftedWindowAttention,)


class _Swin(HeadAdapter):
    kind = "swin"

    def matches(self, module: nn.Module) -> bool:
        classes = _swin_classes()
        return bool(classes) and isinstance(module, classes)

    def heads(self, module: nn.Module) -> tuple[int, int]:
        heads = int(module.num_heads)  # type: ignore[arg-type]
        width = int(getattr(module, "head_dim", module.proj.in_features // heads))  # type: ignore[union-attr,operator]
        return heads, width

    def slices(self, module: nn.Module) -> list[HeadSlice]:
        heads, width = self.heads(module)
        slices = [
            HeadSlice("qkv.weight", 0, _blocks(3, heads, width), weight=True),
            HeadSlice("proj.weight", 1, _blocks(1, heads, width), weight=True),
        ]
        if module.qkv.bias is not None:  # type: ignore[union-attr]
            slices.append(HeadSlice("qkv.bias", 0, _blocks(3, heads, width), weight=False))
        per_head = _blocks(1, heads, 1)
        if hasattr(module, "cpb_mlp"):
            slices.append(HeadSlice("cpb_mlp.2.weight", 0, per_head, weight=False))
            slices.append(HeadSlice("logit_scale", 0, per_head, weight=False))
        else:
            slices.append(HeadSlice("relative_position_bias_table", 1, per_head, weight=False))
        return slices

    def finish(self, module: nn.Module, num_heads: int) -> None:
        module.head_dim = self.heads(module)[1]
        module.num_heads = num_heads
        _refresh_linear(module.qkv)  # type: ignore[arg-type]
        _refresh_linear(module.proj)  # type: ignore[arg-type]
        if hasattr(module, "cpb_mlp"):
            _refresh_linear(module.cpb_mlp[2])  # type: ignore[index]
        module.__class__ = _pruned_subclass(type(module), _swin_pruned_forward)


# --------------------------------------------------------------------------- torchvision MaxViT


def _maxvit_class() -> tuple[type[nn.Module], ...]:
    try:
        from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
    except ImportError:  # pragma: no cover
        return ()
    return (RelativePositionalMultiHeadAttention,)


class _MaxVit(HeadAdapter):
    kind = "maxvit"

    def matches(self, module: nn.Module) -> bool:
        classes = _maxvit_class()
        return bool(classes) and isinstance(module, classes)

    def heads(self, module: nn.Module) -> tuple[int, int]:
        return int(module.n_heads), int(module.head_dim)  # type: ignore[arg-type]

    def slices(self, module: nn.Module) -> list[HeadSlice]:
        heads, width = self.heads(module)
        return [
            HeadSlice("to_qkv.weight", 0, _blocks(3, heads, width), weight=True),
            HeadSlice("to_qkv.bias", 0, _blocks(3, heads, width), weight=False),
            HeadSlice("merge.weight", 1, _blocks(1, heads, width), weight=True),
            HeadSlice("relative_position_bias_table", 1, _blocks(1, heads, 1), weight=False),
        ]

    def finish(self, module: nn.Module, num_heads: int) -> None:
        module.n_heads = num_heads
        _refresh_linear(module.to_qkv)  # type: ignore[arg-type]
        _refresh_linear(module.merge)  # type: ignore[arg-type]
        module.__class__ = _pruned_subclass(type(module), _maxvit_pruned_forward)


def _maxvit_pruned_forward(self: Any, x: Tensor) -> Tensor:
    """MaxViT attention whose output width is ``n_heads · head_dim`` rather than the input width."""
    batch, grid, points, _ = x.shape
    heads, width = self.n_heads, self.head_dim
    q, k, v = torch.chunk(self.to_qkv(x), 3, dim=-1)
    q, k, v = (t.reshape(batch, grid, points, heads, width).permute(0, 1, 3, 2, 4) for t in (q, k, v))
    k = k * self.scale_factor
    scores = torch.einsum("B G H I D, B G H J D -> B G H I J", q, k)
    probabilities = F.softmax(scores + self.get_relative_positional_bias(), dim=-1)
    out = torch.einsum("B G H I J, B G H J D -> B G H I D", probabilities, v)
    return self.merge(out.permute(0, 1, 3, 2, 4).reshape(batch, grid, points, heads * width))


def _swin_pruned_forward(self: Any, x: Tensor) -> Tensor:
    """Shifted-window attention whose inner width is ``num_heads · head_dim``, not the input width."""
    return _shifted_window_attention(
        x,
        self.qkv.weight,
        self.proj.weight,
        self.get_relative_position_bias(),
        self.window_size,
        self.num_heads,
        self.head_dim,
        shift_size=self.shift_size,
        attention_dropout=self.attention_dropout,
        dropout=self.dropout,
        qkv_bias=self.qkv.bias,
        proj_bias=self.proj.bias,
        logit_scale=getattr(self, "logit_scale", None),
        training=self.training,
    )


def _shifted_window_attention(
    input: Tensor,
    qkv_weight: Tensor,
    proj_weight: Tensor,
    relative_position_bias: Tensor,
    window_size: list[int],
    num_heads: int,
    head_dim: int,
    shift_size: list[int],
    attention_dropout: float,
    dropout: float,
    qkv_bias: Tensor | None,
    proj_bias: Tensor | None,
    logit_scale: Tensor | None,
    training: bool,
) -> Tensor:
    """torchvision 0.29's ``shifted_window_attention`` (BSD-3) with the inner width decoupled.

    The only changes: the q/k/v and output reshapes use ``num_heads · head_dim`` instead of
    the input width ``C``, and q is scaled by ``head_dim ** -0.5`` (which equals the
    original ``(C // num_heads) ** -0.5``).
    """
    B, H, W, C = input.shape
    inner = num_heads * head_dim
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    shift_size = shift_size.copy()
    if window_size[0] >= pad_H:
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        length = qkv_bias.numel() // 3
        qkv_bias[length : 2 * length].zero_()
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        q = q * head_dim**-0.5
        attn = q.matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift_size) > 0:
        attn_mask = x.new_zeros((pad_H, pad_W))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                attn_mask[h[0] : h[1], w[0] : w[1]] = count
                count += 1
        attn_mask = attn_mask.view(pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1])
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))
    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention_dropout, training=training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), inner)
    x = F.linear(x, proj_weight, proj_bias)
    x = F.dropout(x, p=dropout, training=training)
    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


def _pruned_subclass(base: type[nn.Module], forward: Callable[..., Tensor]) -> type[nn.Module]:
    """``base`` with ``forward`` replaced; one subclass per base class, reused."""
    if getattr(base, "_spiralkit_head_pruned", False):
        return base
    return _make_pruned_subclass(base, forward)


@functools.cache
def _make_pruned_subclass(base: type[nn.Module], forward: Callable[..., Tensor]) -> type[nn.Module]:
    # Cached so every pruned module of one base class shares one class (isinstance, copies).
    return type(
        f"HeadPruned{base.__name__}",
        (base,),
        {"forward": forward, "_spiralkit_head_pruned": True, "__module__": __name__, "__doc__": forward.__doc__},
    )


# --------------------------------------------------------------------------- Hugging Face, separate projections


@dataclass(frozen=True)
class ProjectionLayout:
    """A Hugging Face attention layout with separate q/k/v/output projections, as data.

    Attributes:
        kind: Adapter name.
        q, k, v, o: Names of the query, key, value and output projections (``nn.Linear``).
        width: Attribute holding the head width (the forward pass reshapes by it and infers
            the head count from the projection widths).
        counts: Attributes holding the number of query heads (patched after removal).
        kv_counts: Attributes holding the number of key/value heads (patched after removal).
        inner: Attributes holding the query width ``heads · width`` (patched after removal).
        groups: Attributes holding the query heads per key/value head (patched after removal).
    """

    kind: str
    q: str
    k: str
    v: str
    o: str
    width: str
    counts: tuple[str, ...] = ()
    kv_counts: tuple[str, ...] = ()
    inner: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()


class _HFProjections(HeadAdapter):
    """Separate q/k/v/o projections (see `ProjectionLayout`), with grouped-query attention.

    With grouped-query attention (fewer key/value heads than query heads), key/value head
    ``g`` serves the ``group = heads / kv_heads`` consecutive query heads ``g·group …
    (g+1)·group − 1``. The prunable unit is then a key/value head *with its query heads*:
    `HeadGroup.num_heads` counts key/value heads, and removing one removes its query heads
    too, so the ratio ``heads / kv_heads`` (``num_key_value_groups``) never changes and the
    KV cache simply holds fewer heads. Without grouping (``kv_heads == heads``) a unit is
    one head. With a single key/value head (multi-query attention) there is nothing to
    group by, so a unit is a query head and the key/value projections stay whole
    (``num_key_value_groups`` shrinks with the query heads).
    """

    def __init__(self, layout: ProjectionLayout) -> None:
        self.layout = layout
        self.kind = layout.kind

    def _projections(self, module: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        lay = self.layout
        return tuple(getattr(module, n) for n in (lay.q, lay.k, lay.v, lay.o))  # type: ignore[return-value]

    def matches(self, module: nn.Module) -> bool:
        lay = self.layout
        return all(isinstance(getattr(module, n, None), nn.Linear) for n in (lay.q, lay.k, lay.v, lay.o)) and isinstance(
            getattr(module, lay.width, None), int)

    def _shape(self, module: nn.Module) -> tuple[int, int, int]:
        """``(query heads, key/value heads, head width)``; raises ValueError on inconsistent widths."""
        q, k, v, o = self._projections(module)
        width = int(getattr(module, self.layout.width))
        name = type(module).__name__
        if width <= 0 or q.out_features % width or k.out_features % width:
            raise ValueError(f"{name}: projection widths {q.out_features}/{k.out_features} are not multiples of "
                             f"{self.layout.width}={width}")
        heads, kv_heads = q.out_features // width, k.out_features // width
        if v.out_features != k.out_features or o.in_features != q.out_features or heads % kv_heads:
            raise ValueError(f"{name}: q/k/v/o widths {q.out_features}/{k.out_features}/{v.out_features}/"
                             f"{o.in_features} do not form {heads} query heads over {kv_heads} key/value heads")
        return heads, kv_heads, width

    def unsupported(self, module: nn.Module) -> str | None:
        try:
            self._shape(module)
        except ValueError as exc:
            return f"{exc} (layout {self.kind!r})"
        return None

    def heads(self, module: nn.Module) -> tuple[int, int]:
        heads, kv_heads, width = self._shape(module)
        return (heads if kv_heads == 1 else kv_heads), width

    def slices(self, module: nn.Module) -> list[HeadSlice]:
        heads, kv_heads, width = self._shape(module)
        lay = self.layout
        if kv_heads == 1:  # multi-query: the units are the query heads; k and v are shared by all
            query = _blocks(1, heads, width)
            pieces = ((lay.q, query),)
        else:
            query = _blocks(1, kv_heads, width * (heads // kv_heads))
            kv = _blocks(1, kv_heads, width)
            pieces = ((lay.q, query), (lay.k, kv), (lay.v, kv))
        slices = [HeadSlice(f"{lay.o}.weight", 1, query, weight=True)]
        for name, block in pieces:
            slices.append(HeadSlice(f"{name}.weight", 0, block, weight=True))
            if getattr(module, name).bias is not None:
                slices.append(HeadSlice(f"{name}.bias", 0, block, weight=False))
        return slices

    def finish(self, module: nn.Module, num_heads: int) -> None:
        for linear in self._projections(module):
            _refresh_linear(linear)  # type: ignore[arg-type]
        heads, kv_heads, width = self._shape(module)
        for attribute, value in ((self.layout.counts, heads), (self.layout.kv_counts, kv_heads),
                                 (self.layout.inner, heads * width), (self.layout.groups, heads // kv_heads)):
            for name in attribute:
                if hasattr(module, name):
                    setattr(module, name, value)


# --------------------------------------------------------------------------- T5


class _T5(_HFProjections):
    """T5's ``T5Attention``: separate projections plus a relative position bias per head.

    The bias is computed by the first layer of a stack and handed to every later layer, so
    that all layers of a stack share one ``(1, heads, q, k)`` tensor. A pruned layer
    therefore keeps that tensor at the original head count (the first layer's bias table is
    never cut) and selects its own heads from it: the kept original head indices are a
    buffer, ``spiralkit_heads`` (not saved: replaying the plan rebuilds it).
    """

    def record(self, module: nn.Module, kept: Tensor) -> None:
        previous = getattr(module, "spiralkit_heads", None)
        if previous is None:
            module.spiralkit_total_heads = int(module.n_heads)  # type: ignore[assignment]
            previous = torch.arange(int(module.n_heads))  # type: ignore[arg-type]
        module.register_buffer("spiralkit_heads", previous.to(kept.device)[kept].clone(), persistent=False)

    def finish(self, module: nn.Module, num_heads: int) -> None:
        super().finish(module, num_heads)
        module.__class__ = _pruned_subclass(type(module), _t5_pruned_forward)


def _t5_pruned_forward(
    self: Any,
    hidden_states: Tensor,
    mask: Tensor | None = None,
    key_value_states: Tensor | None = None,
    position_bias: Tensor | None = None,
    past_key_values: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``T5Attention.forward`` of transformers 5.x for a head-pruned layer.

    The same computation, except that the position bias it receives or computes has the
    layer's original head count (it is shared with the other layers of the stack and
    returned as it is) and only the kept heads' rows (``spiralkit_heads``) are added to the
    scores.
    """
    from transformers.cache_utils import EncoderDecoderCache
    from transformers.models.t5.modeling_t5 import ALL_ATTENTION_FUNCTIONS, eager_attention_forward

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.key_value_proj_dim)
    past_seen = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0
    past_seen = past_seen.clone() if isinstance(past_seen, Tensor) else past_seen
    cross = key_value_states is not None
    query_states = self.q(hidden_states).view(hidden_shape).transpose(1, 2)
    updated = False
    cache = past_key_values
    if isinstance(past_key_values, EncoderDecoderCache):
        updated = past_key_values.is_updated.get(self.layer_idx)
        cache = past_key_values.cross_attention_cache if cross else past_key_values.self_attention_cache
    current = key_value_states if cross else hidden_states
    if cross and past_key_values is not None and updated:
        key_states, value_states = cache.layers[self.layer_idx].keys, cache.layers[self.layer_idx].values
    else:
        kv_shape = (*current.shape[:-1], -1, self.key_value_proj_dim)
        key_states = self.k(current).view(kv_shape).transpose(1, 2)
        value_states = self.v(current).view(kv_shape).transpose(1, 2)
        if past_key_values is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)
            if cross and isinstance(past_key_values, EncoderDecoderCache):
                past_key_values.is_updated[self.layer_idx] = True
    if position_bias is None:
        key_length = key_states.shape[-2]
        if not self.has_relative_attention_bias:
            position_bias = torch.zeros((1, self.spiralkit_total_heads, input_shape[1], key_length),
                                        device=query_states.device, dtype=query_states.dtype)
        else:
            position_bias = self.compute_bias(input_shape[1], key_length, device=query_states.device,
                                              past_seen_tokens=past_seen)
    attention: Callable[..., Any] = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, eager_attention_forward)
    output, weights = attention(
        self, query_states, key_states, value_states, mask,
        dropout=0.0 if not self.training else self.dropout, scaling=self.scaling,
        position_bias=position_bias.index_select(1, self.spiralkit_heads), **kwargs,
    )
    output = self.o(output.reshape(*input_shape, -1).contiguous())
    return output, position_bias, weights


# --------------------------------------------------------------------------- GPT-2


class _GPT2(HeadAdapter):
    """GPT-2's ``GPT2Attention``: one fused ``c_attn`` (``Conv1D``, weight ``(in, 3·E)``) and ``c_proj``."""

    kind = "hf_gpt2"

    def matches(self, module: nn.Module) -> bool:
        return (
            is_conv1d(getattr(module, "c_attn", nn.Identity()))
            and is_conv1d(getattr(module, "c_proj", nn.Identity()))
            and all(hasattr(module, n) for n in ("num_heads", "head_dim", "split_size"))
        )

    def unsupported(self, module: nn.Module) -> str | None:
        if getattr(module, "is_cross_attention", False) or hasattr(module, "q_attn"):
            return f"{type(module).__name__} is cross-attention (separate q_attn), which layout 'hf_gpt2' does not cover"
        return None

    def heads(self, module: nn.Module) -> tuple[int, int]:
        return int(module.num_heads), int(module.head_dim)  # type: ignore[arg-type]

    def slices(self, module: nn.Module) -> list[HeadSlice]:
        heads, width = self.heads(module)
        return [
            HeadSlice("c_attn.weight", 1, _blocks(3, heads, width), weight=True),
            HeadSlice("c_attn.bias", 0, _blocks(3, heads, width), weight=False),
            HeadSlice("c_proj.weight", 0, _blocks(1, heads, width), weight=True),
        ]

    def finish(self, module: nn.Module, num_heads: int) -> None:
        module.num_heads = num_heads
        module.split_size = num_heads * int(module.head_dim)  # type: ignore[arg-type]
        for conv in (module.c_attn, module.c_proj):
            conv.nx, conv.nf = (int(s) for s in conv.weight.shape)  # type: ignore[union-attr]


HF_LAYOUTS: tuple[ProjectionLayout, ...] = (
    # transformers 5.x naming: Llama, Mistral, Qwen2/3, Gemma, ViT, DeiT, ... (grouped-query aware)
    ProjectionLayout("hf_qkvo", "q_proj", "k_proj", "v_proj", "o_proj", "head_dim",
                     counts=("num_heads", "num_attention_heads"), kv_counts=("num_key_value_heads",),
                     groups=("num_key_value_groups",)),
    # q/k/v_proj with out_proj: CLIP, SigLIP, BART, Whisper, OPT, ...
    ProjectionLayout("hf_qkv_out", "q_proj", "k_proj", "v_proj", "out_proj", "head_dim", counts=("num_heads",)),
    ProjectionLayout("hf_distilbert", "q_lin", "k_lin", "v_lin", "out_lin", "attention_head_size",
                     counts=("n_heads",)),
)
"""The separate-projection layouts, one line per family."""

_T5_LAYOUT = ProjectionLayout("hf_t5", "q", "k", "v", "o", "key_value_proj_dim", counts=("n_heads",), inner=("inner_dim",))


# --------------------------------------------------------------------------- shared


def _refresh_linear(linear: nn.Linear) -> None:
    """Make ``in_features``/``out_features`` match the (sliced) weight."""
    linear.out_features, linear.in_features = (int(s) for s in linear.weight.shape)


from spiralkit.graph.attention_timm import TIMM_ADAPTERS  # noqa: E402 (its adapters subclass HeadAdapter)

ADAPTERS: tuple[HeadAdapter, ...] = (_TorchMHA(), _HFBert(), _Swin(), _MaxVit(), _GPT2(), _T5(_T5_LAYOUT),
                                     *(_HFProjections(layout) for layout in HF_LAYOUTS), *TIMM_ADAPTERS)
"""The supported attention layouts, tried in this order."""


def adapter_for(module: nn.Module) -> HeadAdapter | None:
    """The adapter for ``module``'s layout, or None."""
    return next((adapter for adapter in ADAPTERS if adapter.matches(module)), None)


def _adapter(kind: str) -> HeadAdapter:
    for adapter in ADAPTERS:
        if adapter.kind == kind:
            return adapter
    raise KeyError(kind)


def find_attention(model: nn.Module) -> tuple[list[HeadGroup], dict[str, str], list[nn.Module]]:
    """Every attention layer of ``model`` that an adapter understands.

    Returns:
        ``(groups, unsupported, opaque)``: head groups in model order; name → reason for
        attention layers whose heads cannot be pruned; the modules to keep whole in channel
        tracing (their forward passes mix heads).
    """
    groups: list[HeadGroup] = []
    unsupported: dict[str, str] = {}
    opaque: list[nn.Module] = []
    inside: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in inside:
            continue
        adapter = adapter_for(module)
        if adapter is None:
            continue
        if (whole := adapter.opaque(module)) is not None:
            opaque.append(whole)
        inside.update(id(m) for m in module.modules())
        reason = adapter.unsupported(module)
        if reason is not None:
            unsupported[name] = reason
            continue
        heads, width = adapter.heads(module)
        groups.append(HeadGroup(module=name, kind=adapter.kind, num_heads=heads, head_dim=width))
    return groups, unsupported, opaque


def _projection_count(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if isinstance(m, nn.Linear) or is_conv1d(m))


def unknown_attention(model: nn.Module) -> dict[str, str]:
    """Modules that look like attention but that no adapter understands: name → class name.

    A module looks like attention when its class name contains "Attention" and it holds at
    least two linear layers; only the innermost such module is reported, and nothing inside
    or around a layer an adapter understands.
    """
    named = list(model.named_modules())
    known = [name for name, module in named if adapter_for(module) is not None]

    def related(name: str, other: str) -> bool:  # one inside the other (or the same)
        return name == other or name.startswith(other + ".") or other.startswith(name + ".") or other == "" or name == ""

    candidates = [
        (name, module) for name, module in named
        if "attention" in type(module).__name__.lower() and _projection_count(module) >= 2
        and not any(related(name, k) for k in known)
    ]
    return {
        name: type(module).__name__ for name, module in candidates
        if not any(other != name and other.startswith(name + ".") for other, _ in candidates)
    }


def known_layouts() -> str:
    """The adapter names, for messages."""
    return ", ".join(adapter.kind for adapter in ADAPTERS)


def head_slices(model: nn.Module, group: HeadGroup) -> list[tuple[Tensor, HeadSlice]]:
    """``(parameter, slice)`` pairs of one head group, read from ``model``."""
    module = model.get_submodule(group.module)
    adapter = _adapter(group.kind)
    return [(_get_param(module, s.path), s) for s in adapter.slices(module)]


def _get_param(module: nn.Module, path: str) -> Tensor:
    owner, _, attribute = path.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attribute)


def _set_param(module: nn.Module, path: str, value: Tensor, *, requires_grad: bool) -> None:
    owner, _, attribute = path.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, attribute,
            nn.Parameter(value, requires_grad=requires_grad))


def _edit(model: nn.Module, group: HeadGroup, keep: Sequence[int], edit: Callable[[nn.Module, HeadSlice, Tensor], None]) -> nn.Module:
    module = model.get_submodule(group.module)
    adapter = _adapter(group.kind)
    heads, width = adapter.heads(module)
    if (heads, width) != (group.num_heads, group.head_dim):
        from spiralkit.errors import PruneError

        raise PruneError(
            f"plan does not fit the model: attention {group.module!r} has {heads} heads of width {width}, "
            f"the plan expects {group.num_heads} of width {group.head_dim}"
        )
    kept = torch.as_tensor(sorted(keep), dtype=torch.long)
    for piece in adapter.slices(module):
        edit(module, piece, kept)
    return module


def mask_heads(model: nn.Module, group: HeadGroup, keep: Sequence[int]) -> None:
    """Zero every entry of the heads not in ``keep`` (shapes unchanged)."""
    dropped = torch.as_tensor(sorted(set(range(group.num_heads)) - set(keep)), dtype=torch.long)

    def zero(module: nn.Module, piece: HeadSlice, kept: Tensor) -> None:
        param = _get_param(module, piece.path)
        with torch.no_grad():
            param.index_fill_(piece.dim, piece.index[:, dropped, :].flatten(), 0.0)

    _edit(model, group, keep, zero)


def remove_heads(model: nn.Module, group: HeadGroup, keep: Sequence[int]) -> None:
    """Delete the heads not in ``keep`` and patch the module so that it runs."""
    if len(keep) == group.num_heads:
        return

    def cut(module: nn.Module, piece: HeadSlice, kept: Tensor) -> None:
        param = _get_param(module, piece.path)
        value = param.detach().index_select(piece.dim, piece.index[:, kept, :].flatten()).clone()
        _set_param(module, piece.path, value, requires_grad=param.requires_grad)

    module = _edit(model, group, keep, cut)
    adapter = _adapter(group.kind)
    adapter.record(module, torch.as_tensor(sorted(keep), dtype=torch.long))
    adapter.finish(module, len(keep))
    if group.kind == "torch_mha":
        _disable_nested_fast_path(model)


def _disable_nested_fast_path(model: nn.Module) -> None:
    # nn.TransformerEncoder decides at construction whether to pack padded batches into
    # nested tensors for the fused kernel; a head-pruned layer cannot take them.
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
