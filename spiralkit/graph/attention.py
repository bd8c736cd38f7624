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
* ``timm_*`` — timm's layouts (ViT/DeiT, rotary with grouped-query, Swin, BEiT, LeViT, EVA), in `spiralkit.graph.attention_timm`.

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

__all__ = [
    "ADAPTERS",
    "HeadAdapter",
    "HeadGroup",
    "HeadPrunedMultiheadAttention",
    "HeadSlice",
    "adapter_for",
    "find_attention",
    "head_slices",
    "mask_heads",
    "remove_heads",
]


@dataclass(frozen=True)
class HeadGroup:
    """One attention layer whose heads can be pruned.

    Attributes:
        module: Dotted name of the attention module (the one holding all projections).
        kind: Adapter name (``torch_mha``, ``hf_bert``, ``swin``, ``maxvit``).
        num_heads: Number of heads.
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


# --------------------------------------------------------------------------- shared


def _refresh_linear(linear: nn.Linear) -> None:
    """Make ``in_features``/``out_features`` match the (sliced) weight."""
    linear.out_features, linear.in_features = (int(s) for s in linear.weight.shape)


from spiralkit.graph.attention_timm import TIMM_ADAPTERS  # noqa: E402 (its adapters subclass HeadAdapter)

ADAPTERS: tuple[HeadAdapter, ...] = (_TorchMHA(), _HFBert(), _Swin(), _MaxVit(), *TIMM_ADAPTERS)
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
    _adapter(group.kind).finish(module, len(keep))
    if group.kind == "torch_mha":
        _disable_nested_fast_path(model)


def _disable_nested_fast_path(model: nn.Module) -> None:
    # nn.TransformerEncoder decides at construction whether to pack padded batches into
    # nested tensors for the fused kernel; a head-pruned layer cannot take them.
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
