"""Head adapters for timm's attention layouts (fused ``qkv`` and its relatives).

Each adapter describes one timm attention class as data — which rows and columns of which
parameter belong to each head — as `spiralkit.graph.attention` does for torch and Hugging
Face layouts; `spiralkit.graph.attention.ADAPTERS` lists them. Classes are matched by exact
type (a subclass may have another forward pass), and timm is imported only for modules
defined in a ``timm.`` module, so models without timm layers never import it.

* ``timm_vit`` — ``timm.layers.Attention`` (ViT, DeiT, and every timm model built on it): a
  fused ``qkv`` with q, k and v as three blocks of heads, ``proj``, and an optional ``gate``.
  Its forward pass reshapes by ``num_heads``, ``head_dim`` and ``attn_dim``, so patching
  those attributes is enough. With ``scale_norm`` (a LayerNorm over all heads' outputs)
  removing a head would change the normalisation of the others: refused.
* ``timm_swin`` — ``timm.models.swin_transformer.WindowAttention``: as ``timm_vit`` plus the
  relative position bias table (one column per head).
* ``timm_swin_v2`` — ``timm.models.swin_transformer_v2.WindowAttention``: fused ``qkv`` with
  ``q_bias``/``v_bias`` (the zero ``k_bias`` buffer is rebuilt), the per-head logit scale and
  the last layer of the continuous position bias MLP; its forward pass reshapes the heads'
  output to the input width, so a pruned layer gets one that uses the inner width.
* ``timm_levit`` — LeViT's ``Attention`` and ``AttentionDownsample``: q, k and v interleaved
  *per head* (``[q_h k_h v_h]`` for every head ``h``), each projection a ``LinearNorm``
  (linear + batch norm, whose affine parameters and running statistics are cut with the
  rows) and per-head attention biases. Its eval-mode cache of the biases is cleared when heads
  are removed; after masking, the stale biases of a masked head do not matter (its values are
  zero). The convolutional variant (``use_conv=True``) is refused.
* ``timm_eva`` — ``timm.models.eva.EvaAttention`` (EVA, EVA-02): fused ``qkv`` with separate
  ``q_bias``/``v_bias`` (the zero ``k_bias`` buffer is rebuilt), or separate ``q/k/v_proj``.
  Its forward pass reshapes the heads' output to the *input* width, so a pruned layer gets
  a forward pass that uses ``num_heads · head_dim``. ``scale_norm`` is refused as above.
* ``timm_rope`` — ``timm.layers.AttentionRope`` (EVA with ``attn_type="rope"``, DeepSeek's
  ViT), with **grouped-query attention**: a unit is one key/value head together with the
  ``num_kv_groups`` query heads that read it (query heads ``h`` with ``h // num_kv_groups``
  equal, contiguous in ``q_proj`` and ``proj``), so ``num_heads`` in the plan counts key/value
  heads. Without grouping (or with a fused ``qkv``) it is ``timm_vit``'s layout. The forward
  pass reshapes by the head counts and widths, so patching them is enough.
* ``timm_beit`` — ``timm.models.beit.Attention`` (BEiT, BEiT v2): as ``timm_swin_v2`` for the
  biases, plus a per-layer relative position bias table (one column per head). A layer
  without its own table — one table shared by all layers, or none — is refused.
* ``timm_glu_mlp`` — not attention but the same kind of layout: timm's ``GluMlp`` (EVA-02's
  SwiGLU FFN) computes value and gate halves with one fused ``fc1`` and splits it in code, which
  channel tracing cannot follow. Each hidden unit is a one-wide "head": its row in both
  halves of ``fc1`` and its column of ``fc2`` go together, so the FFN is pruned like heads
  (by the same ratio; ``round_to`` does not apply). A normalised hidden layer (``scale_mlp``)
  or the convolutional variant is refused.
* ``timm_unknown`` — any other timm module with ``num_heads`` and a ``qkv``-like projection:
  reported as an attention layout without a head adapter (its heads are kept). It is traced
  like any other layers, so channel groups ending at its projections' inputs are still cut.

Masking a head zeroes exactly what removing it deletes, so a masked model and its pruned
twin agree (``tests/prune/test_timm_heads.py``).
"""

from __future__ import annotations

import functools
import importlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spiralkit.graph.attention import HeadAdapter, HeadSlice, _pruned_subclass

__all__ = ["TIMM_ADAPTERS"]


@functools.cache
def _timm_class(module: str, name: str) -> type[nn.Module] | None:
    """``timm.<module>.<name>``, or None when timm (or the class) is not there."""
    try:
        return getattr(importlib.import_module(f"timm.{module}"), name)
    except (ImportError, AttributeError):  # pragma: no cover - timm is a dependency
        return None


def _is_timm(module: nn.Module, *classes: tuple[str, str]) -> bool:
    """Whether ``module``'s type is exactly one of the timm ``(module, class)`` pairs.

    A layer pruned before has a pruned subclass of its timm class (a forward pass of
    `_pruned_subclass`); it still matches, so that a later round prunes it again.
    """
    kind = type(module)
    if getattr(kind, "_spiralkit_head_pruned", False):
        kind = kind.__mro__[1]
    if not kind.__module__.startswith("timm."):
        return False
    return any(kind is _timm_class(*where) for where in classes)


def _blocks(segments: int, heads: int, width: int) -> Tensor:
    """``(segments, heads, width)`` indices of ``segments`` back-to-back blocks of heads."""
    return torch.arange(segments * heads * width).view(segments, heads, width)


def _interleaved(heads: int, width: int) -> Tensor:
    """``(1, heads, width)`` indices of heads stored one after another (each ``width`` wide)."""
    return _blocks(1, heads, width)


def _refresh(linear: nn.Linear) -> None:
    """Make ``in_features``/``out_features`` match the (sliced) weight."""
    linear.out_features, linear.in_features = (int(s) for s in linear.weight.shape)


def _scale_norm_reason(module: nn.Module) -> str | None:
    if isinstance(getattr(module, "norm", None), nn.Identity) or getattr(module, "norm", None) is None:
        return None
    return (f"timm {type(module).__name__} with scale_norm normalises all heads' outputs together "
            f"({type(module.norm).__name__}), so removing a head would change the others: heads are kept")


# --------------------------------------------------------------------------- ViT / DeiT


class _HeadDimAttention(HeadAdapter):
    """timm attentions that carry ``num_heads`` and ``head_dim``, with an optional ``scale_norm``."""

    def unsupported(self, module: nn.Module) -> str | None:
        return _scale_norm_reason(module)

    def heads(self, module: nn.Module) -> tuple[int, int]:
        return int(module.num_heads), int(module.head_dim)  # type: ignore[arg-type]


def _refresh_present(module: nn.Module, names: tuple[str, ...]) -> None:
    """`_refresh` each of ``module``'s ``Linear`` children among ``names`` that exists."""
    for name in names:
        if isinstance(getattr(module, name, None), nn.Linear):
            _refresh(getattr(module, name))


class _TimmVit(_HeadDimAttention):
    kind = "timm_vit"

    def matches(self, module: nn.Module) -> bool:
        return _is_timm(module, ("layers.attention", "Attention"))

    def slices(self, module: nn.Module) -> list[HeadSlice]:
        heads, width = self.heads(module)
        return [*_fused_qkv(module.qkv, heads, width), HeadSlice("proj.weight", 1, _blocks(1, heads, width), weight=True),  # type: ignore[arg-type]
                *_optional_linear(module, "gate", heads, width)]

    def finish(self, module: nn.Module, num_heads: int) -> None:
        module.num_heads = num_heads
        module.attn_dim = num_heads * int(module.head_dim)  # type: ignore[arg-type]
        _refresh_present(module, ("qkv", "proj", "gate"))


def _fused_qkv(qkv: nn.Linear, heads: int, width: int) -> list[HeadSlice]:
    """``qkv``, a ``Linear`` whose outputs are the q, k and v blocks, each ``heads × width``."""
    slices = [HeadSlice("qkv.weight", 0, _blocks(3, heads, width), weight=True)]
    if qkv.bias is not None:
        slices.append(HeadSlice("qkv.bias", 0, _blocks(3, heads, width), weight=False))
    return slices


def _optional_linear(module: nn.Module, name: str, heads: int, width: int) -> list[HeadSlice]:
    """A ``Linear`` (if present) whose outputs are ``heads × width`` (e.g. a per-head gate)."""
    linear = getattr(module, name, None)
    if not isinstance(linear, nn.Linear):
        return []
    slices = [HeadSlice(f"{name}.weight", 0, _blocks(1, heads, width), weight=True)]
    if linear.bias is not None:
        slices.append(HeadSlice(f"{name}.bias", 0, _blocks(1, heads, width), weight=False))
    return slices


# --------------------------------------------------------------------------- rotary / grouped-query


class _TimmRope(HeadAdapter):
    kind = "timm_rope"

    def matches(self, module: nn.Module) -> bool:
        return _is_timm(module, ("layers.attention", "AttentionRope"))

    def unsupported(self, module: nn.Module) -> str | None:
        return _scale_norm_reason(module)

    def heads(self, module: nn.Module) -> tuple[int, int]:
        """``(key/value heads, width of the query heads of one)``."""
        return int(module.num_kv_heads), int(module.num_kv_groups) * int(module.head_dim)  # type: ignore[arg-type]

    def slices(self, module: nn.Module) -> list[HeadSlice]:
        units, query_width = self.heads(module)
        width = int(module.head_dim)  # type: ignore[arg-type]
        if module.qkv is not None:  # fused: no grouping (one query head per key/value head)
            projections = _fused_qkv(module.qkv, units, width)  # type: ignore[arg-type]
        else:
            projections = [*_optional_linear(module, "q_proj", units, query_width),
                           *_optional_linear(module, "k_proj", units, width),
                           *_optional_linear(module, "v_proj", units, width)]
        return [*projections, HeadSlice("proj.weight", 1, _blocks(1, units, query_width), weight=True),
                *_optional_linear(module, "gate", units, query_width)]

    def finish(self, module: nn.Module, num_heads: int) -> None:
        width, groups = int(module.head_dim), int(module.num_kv_groups)  # type: ignore[arg-type]
        module.num_kv_heads = num_heads
        module.num_heads = num_heads * groups
        module.attn_dim = num_heads * groups * width
        module.kv_dim = num_heads * width
        _refresh_present(module, ("qkv", "q_proj", "k_proj", "v_proj", "proj", "gate"))


# --------------------------------------------------------------------------- Swin


class _ProjWidthHeads(HeadAdapter):
    """timm attentions with ``num_heads``, a fused ``qkv`` (with optional ``q_bias``/``v_bias``
    and a zero ``k_bias`` buffer) and ``proj``, whose head width is ``proj.in_features / num_heads``.

    Subclasses add their per-head tables (`extra_slices`) and, where timm's forward reshapes
    by the input width, a pruned forward (`finish`).
    """

    def heads(self, module: nn.Module) -> tuple[int, int]:
        heads = int(module.num_heads)  # type: ignore[arg-type]
        return heads, module.proj.in_features // heads  # type: ignore[union-attr,operator]

    def slices(self, module: nn.Module) -> list[HeadSlice]:
        heads, width = self.heads(module)
        return [
            *_fused_qkv(module.qkv, heads, width),  # type: ignore[arg-type]
            *_qv_biases(module, heads, width),
            HeadSlice("proj.weight", 1, _blocks(1, heads, width), weight=True),
            *self.extra_slices(heads),
        ]

    def extra_slices(self, heads: int) -> list[HeadSlice]:
        """Per-head parameters besides the projections (bias tables, scales)."""
        return []

    def finish(self, module: nn.Module, num_heads: int) -> None:
        module.num_heads = num_heads
        _refresh(module.qkv)  # type: ignore[arg-type]
        _refresh(module.proj)  # type: ignore[arg-type]
        _zero_k_bias(module)


class _TimmSwin(_ProjWidthHeads):
    kind = "timm_swin"

    def matches(self, module: nn.Module) -> bool:
        return _is_timm(module, ("models.swin_transformer", "WindowAttention"))

    def extra_slices(self, heads: int) -> list[HeadSlice]:
        # The forward pass reshapes by num_heads and -1: finish has nothing else to patch.
        return [HeadSlice("relative_position_bias_table", 1, _blocks(1, heads, 1), weight=False)]


class _TimmSwinV2(_ProjWidthHeads):
    kind = "timm_swin_v2"

    def matches(self, module: nn.Module) -> bool:
        return _is_timm(module, ("models.swin_transformer_v2", "WindowAttention"))

    def extra_slices(self, heads: int) -> list[HeadSlice]:
        per_head = _blocks(1, heads, 1)
        return [HeadSlice("logit_scale", 0, per_head, weight=False), HeadSlice("cpb_mlp.2.weight", 0, per_head, weight=False)]

    def finish(self, module: nn.Module, num_heads: int) -> None:
        super().finish(module, num_heads)
        _refresh(module.cpb_mlp[2])  # type: ignore[index,arg-type]
        module.__class__ = _pruned_subclass(type(module), _swin_v2_pruned_forward)


def _qv_biases(module: nn.Module, heads: int, width: int) -> list[HeadSlice]:
    """``q_bias`` and ``v_bias`` (if present) of a fused ``qkv`` whose key bias is a zero buffer."""
    return [HeadSlice(name, 0, _blocks(1, heads, width), weight=False)
            for name in ("q_bias", "v_bias") if getattr(module, name, None) is not None]


def _zero_k_bias(module: nn.Module) -> None:
    """Rebuild the zero ``k_bias`` buffer at the pruned width (there is nothing in it to slice)."""
    if getattr(module, "k_bias", None) is not None:
        module.register_buffer("k_bias", torch.zeros_like(module.q_bias), persistent=False)  # type: ignore[arg-type]


def _swin_v2_pruned_forward(self: Any, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Swin V2 window attention whose inner width is ``proj.in_features``, not the input width.

    timm 1.0's ``swin_transformer_v2.WindowAttention.forward`` (Apache-2.0) with one change:
    the heads' output is reshaped to the inner width before the output projection.
    """
    B_, N, _ = x.shape
    if self.q_bias is None:
        qkv = self.qkv(x)
    else:
        qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        if self.qkv_bias_separate:
            qkv = self.qkv(x) + qkv_bias
        else:
            qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
    q, k, v = qkv.reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    attn = attn * torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
    table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
    area = self.window_size[0] * self.window_size[1]
    bias = table[self.relative_position_index.view(-1)].view(area, area, -1).permute(2, 0, 1).contiguous()
    attn = attn + 16 * torch.sigmoid(bias).unsqueeze(0)
    if mask is not None:
        num_win = mask.shape[0]
        attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, self.num_heads, N, N)
    attn = self.attn_drop(self.softmax(attn))
    x = (attn @ v).transpose(1, 2).reshape(B_, N, self.proj.in_features)
    return self.proj_drop(self.proj(x))


# --------------------------------------------------------------------------- BEiT


class _TimmBeit(_ProjWidthHeads):
    kind = "timm_beit"

    def matches(self, module: nn.Module) -> bool:
        return _is_timm(module, ("models.beit", "Attention"))

    def unsupported(self, module: nn.Module) -> str | None:
        if module.relative_position_bias_table is None:
            return ("timm BEiT attention without its own relative position bias table (one table shared by "
                    "all layers, use_shared_rel_pos_bias=True, or none) has no head adapter: heads are kept")
        return None

    def extra_slices(self, heads: int) -> list[HeadSlice]:
        return [HeadSlice("relative_position_bias_table", 1, _blocks(1, heads, 1), weight=False)]

    def finish(self, module: nn.Module, num_heads: int) -> None:
        super().finish(module, num_heads)
        module.__class__ = _pruned_subclass(type(module), _beit_pruned_forward)


def _beit_pruned_forward(self: Any, x: Tensor, shared_rel_pos_bias: Tensor | None = None) -> Tensor:
    """BEiT attention whose inner width is ``proj.in_features``, not the input width.

    timm 1.0's ``beit.Attention.forward`` (Apache-2.0) with one change: the heads' output is
    reshaped to the inner width before the output projection.
    """
    B, N, _ = x.shape
    if self.q_bias is None:
        qkv = self.qkv(x)
    else:
        qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        if self.qkv_bias_separate:
            qkv = self.qkv(x) + qkv_bias
        else:
            qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
    q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = self._get_rel_pos_bias()
    if shared_rel_pos_bias is not None:
        bias = bias + shared_rel_pos_bias
    if self.fused_attn:
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0)
    else:
        x = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)) @ v
    x = x.transpose(1, 2).reshape(B, N, self.proj.in_features)
    return self.proj_drop(self.proj(x))


# --------------------------------------------------------------------------- LeViT


class _TimmLevit(HeadAdapter):
    kind = "timm_levit"

    def matches(self, module: nn.Module) -> bool:
        return _is_timm(module, ("models.levit", "Attention"), ("models.levit", "AttentionDownsample"))

    def unsupported(self, module: nn.Module) -> str | None:
        if module.use_conv:
            return f"timm LeViT {type(module).__name__} with use_conv=True (the convolutional layout) has no head adapter"
        return None

    def heads(self, module: nn.Module) -> tuple[int, int]:
        return int(module.num_heads), int(module.val_dim)  # type: ignore[arg-type]

    def slices(self, module: nn.Module) -> list[HeadSlice]:
        heads, key, value = int(module.num_heads), int(module.key_dim), int(module.val_dim)  # type: ignore[arg-type]
        if hasattr(module, "qkv"):  # Attention: [q k v] per head
            projections = [("qkv", 2 * key + value)]
        else:  # AttentionDownsample: [k v] per head, q separately (after the subsampling)
            projections = [("kv", key + value), ("q.ln", key)]
        slices = [piece for prefix, width in projections for piece in _linear_norm(prefix, heads, width)]
        return [
            *slices,
            HeadSlice("proj.ln.linear.weight", 1, _interleaved(heads, value), weight=True),
            HeadSlice("attention_biases", 0, _interleaved(heads, 1), weight=False),
        ]

    def finish(self, module: nn.Module, num_heads: int) -> None:
        module.num_heads = num_heads
        module.key_attn_dim = num_heads * int(module.key_dim)  # type: ignore[arg-type]
        module.val_attn_dim = num_heads * int(module.val_dim)  # type: ignore[arg-type]
        for prefix in ("qkv", "kv", "q.ln", "proj.ln"):
            try:
                norm = module.get_submodule(prefix)
            except AttributeError:
                continue
            _refresh(norm.linear)  # type: ignore[arg-type]
            _restore_batch_norm(norm.bn)  # type: ignore[arg-type]
        module.attention_bias_cache = {}  # cached biases hold the old heads


def _linear_norm(prefix: str, heads: int, width: int) -> list[HeadSlice]:
    """A LeViT ``LinearNorm`` (linear, then batch norm) whose outputs are ``heads × width``, per head."""
    index = _interleaved(heads, width)
    return [
        HeadSlice(f"{prefix}.linear.weight", 0, index, weight=True),
        *(HeadSlice(f"{prefix}.bn.{name}", 0, index, weight=False)
          for name in ("weight", "bias", "running_mean", "running_var")),
    ]


def _restore_batch_norm(norm: nn.modules.batchnorm._BatchNorm) -> None:
    """Make the (sliced) running statistics buffers again and fix ``num_features``.

    Slicing stores every entry back as a parameter; running statistics are buffers (they
    must stay out of ``parameters()`` and keep their state-dict keys).
    """
    for name in ("running_mean", "running_var"):
        value = norm._parameters.pop(name, None)
        if value is not None:
            norm.register_buffer(name, value.detach())
    norm.num_features = int(norm.weight.shape[0])


# --------------------------------------------------------------------------- EVA


class _TimmEva(_HeadDimAttention):
    kind = "timm_eva"

    def matches(self, module: nn.Module) -> bool:
        return _is_timm(module, ("models.eva", "EvaAttention"))

    def slices(self, module: nn.Module) -> list[HeadSlice]:
        heads, width = self.heads(module)
        block = _blocks(1, heads, width)
        if module.qkv is not None:
            # k_bias is a zero buffer (EVA has no key bias): rebuilt by finish, nothing to mask.
            slices = [*_fused_qkv(module.qkv, heads, width), *_qv_biases(module, heads, width)]  # type: ignore[arg-type]
        else:
            slices = [piece for name in ("q_proj", "k_proj", "v_proj")
                      for piece in _optional_linear(module, name, heads, width)]
        return [*slices, HeadSlice("proj.weight", 1, block, weight=True), *_optional_linear(module, "gate", heads, width)]

    def finish(self, module: nn.Module, num_heads: int) -> None:
        module.num_heads = num_heads
        _refresh_present(module, ("qkv", "q_proj", "k_proj", "v_proj", "proj", "gate"))
        _zero_k_bias(module)
        module.__class__ = _pruned_subclass(type(module), _eva_pruned_forward)


def _eva_pruned_forward(
    self: Any, x: Tensor, rope: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False
) -> Tensor:
    """EVA attention whose inner width is ``num_heads · head_dim``, not the input width.

    timm 1.0's ``EvaAttention.forward`` (Apache-2.0) with one change: the heads' output is
    reshaped to ``num_heads · head_dim`` before the output projection.
    """
    from timm.layers import apply_rot_embed_cat
    from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

    B, N, _ = x.shape
    gate = self.gate(x).sigmoid() if self.gate is not None else None
    if self.qkv is not None:
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            if self.qkv_bias_separate:
                qkv = self.qkv(x) + qkv_bias
            else:
                qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = self.q_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        k = self.k_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        v = self.v_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
    q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
        npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
        q = torch.cat([q[:, :, :npt, :], apply_rot_embed_cat(q[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt, :], apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
    if self.fused_attn:
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.attn_drop.p if self.training else 0.0, is_causal=is_causal)
    else:
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal=is_causal))
        x = self.attn_drop(attn.softmax(dim=-1)) @ v
    x = self.norm(x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


# --------------------------------------------------------------------------- GLU FFN


class _TimmGluMlp(HeadAdapter):
    kind = "timm_glu_mlp"

    def matches(self, module: nn.Module) -> bool:
        return _is_timm(module, ("layers.mlp", "GluMlp"))

    def unsupported(self, module: nn.Module) -> str | None:
        if not isinstance(module.fc1, nn.Linear) or not isinstance(module.fc2, nn.Linear):
            return "timm GluMlp with convolutions (use_conv=True) has no adapter: its hidden units are kept"
        if not isinstance(module.norm, nn.Identity):
            return (f"timm GluMlp normalises its hidden units together ({type(module.norm).__name__}), "
                    "so removing one would change the others: they are kept")
        return None

    def heads(self, module: nn.Module) -> tuple[int, int]:
        return int(module.fc2.in_features), 1  # type: ignore[union-attr,arg-type]

    def slices(self, module: nn.Module) -> list[HeadSlice]:
        hidden = self.heads(module)[0]
        both_halves = _blocks(2, hidden, 1)  # fc1 = [value or gate | gate or value]
        slices = [HeadSlice("fc1.weight", 0, both_halves, weight=True),
                  HeadSlice("fc2.weight", 1, _blocks(1, hidden, 1), weight=True)]
        if module.fc1.bias is not None:  # type: ignore[union-attr]
            slices.append(HeadSlice("fc1.bias", 0, both_halves, weight=False))
        return slices

    def finish(self, module: nn.Module, num_heads: int) -> None:
        _refresh(module.fc1)  # type: ignore[arg-type]
        _refresh(module.fc2)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- anything else


_PROJECTIONS = ("qkv", "q", "kv", "k", "v", "q_proj", "k_proj", "v_proj", "to_qkv", "qk")


class _TimmUnknown(HeadAdapter):
    """A timm module that looks like attention (``num_heads`` and a q/k/v projection) but has no adapter."""

    kind = "timm_unknown"

    def matches(self, module: nn.Module) -> bool:
        return (
            type(module).__module__.startswith("timm.")
            and isinstance(getattr(module, "num_heads", None), int)
            and any(isinstance(getattr(module, name, None), nn.Module) for name in _PROJECTIONS)
        )

    def unsupported(self, module: nn.Module) -> str | None:
        cls = type(module)
        return f"this attention layout ({cls.__module__}.{cls.__qualname__}) has no head adapter; its heads are kept"

    def opaque(self, module: nn.Module) -> nn.Module | None:
        # Traced like any other layers: a group that only feeds its projections (their input
        # side) stays prunable, as it was before this layout was recognised.
        return None

    def heads(self, module: nn.Module) -> tuple[int, int]:
        raise NotImplementedError(self.unsupported(module))

    def slices(self, module: nn.Module) -> list[HeadSlice]:
        raise NotImplementedError(self.unsupported(module))

    def finish(self, module: nn.Module, num_heads: int) -> None:
        raise NotImplementedError(self.unsupported(module))


TIMM_ADAPTERS: tuple[HeadAdapter, ...] = (
    _TimmVit(), _TimmRope(), _TimmSwin(), _TimmSwinV2(), _TimmBeit(), _TimmLevit(), _TimmEva(), _TimmGluMlp(), _TimmUnknown()
)
"""timm's attention layouts, tried in this order (the catch-all last)."""
