"""Distillation losses: logits, hints, attention maps, attention probabilities, contrastive.

Plain functions compute each loss from tensors; the few losses that learn something of
their own (adapters, projections) are small ``nn.Module`` s that own those parameters.
Teacher tensors are always treated as constants (detached).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spiralkit.distill.adapters import make_adapter
from spiralkit.distill.taps import DistillError

__all__ = [
    "CRDLoss",
    "HintLoss",
    "LayerMapLoss",
    "anneal",
    "attention_map",
    "attention_probs_loss",
    "attention_transfer_loss",
    "hint_loss",
    "info_nce",
    "kd_loss",
    "value_relation",
    "value_relation_loss",
    "weighted_sum",
]

# Floor of probabilities under a logarithm: a student that puts zero mass where the teacher
# puts some gets a large, finite loss instead of inf.
_EPS = 1e-12


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    *,
    alpha: float,
    temperature: float,
    ignore_index: int = -100,
) -> Tensor:
    """Logit distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network").

    ``L = α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1−α)·CE(z_s, y)``

    Both terms are averaged over the predictions; the ``T²`` factor keeps the KL term's
    gradients on the same scale as the cross-entropy's when the temperature changes.

    A prediction is one row of logits: one per example for classifiers (logits
    ``(batch, classes)``, targets ``(batch,)``), one per token for language models (logits
    ``(batch, seq, vocab)``, targets ``(batch, seq)``, as `spiralkit.tasks.Perplexity` scores
    them). Logits are flattened to ``(batch·seq, vocab)`` and targets to ``(batch·seq,)``;
    predictions whose target is ``ignore_index`` count in neither term.

    Args:
        student_logits: ``z_s``, shape (batch, classes) or (batch, seq, vocab).
        teacher_logits: ``z_t``, same shape; treated as a constant.
        targets: class indices ``y``, shape ``student_logits.shape[:-1]``.
        alpha: weight of the distillation term, in [0, 1].
        temperature: softening temperature ``T > 0``.
        ignore_index: target value of predictions left out (padding).

    Raises:
        ValueError: ``alpha`` or ``temperature`` out of range, or shapes that do not fit.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kd_loss: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if student_logits.dim() < 2 or targets.shape != student_logits.shape[:-1]:
        raise ValueError(f"kd_loss: targets {tuple(targets.shape)} do not fit logits {tuple(student_logits.shape)}: "
                         f"need logits (..., classes) and targets of the logits' shape without the last dimension")
    classes = student_logits.shape[-1]
    student_flat = student_logits.reshape(-1, classes).float()  # bf16 logits (mixed precision): softmax in fp32
    teacher_flat = teacher_logits.detach().reshape(-1, classes).float()
    targets_flat = targets.reshape(-1)
    scored = (targets_flat != ignore_index).to(student_flat.dtype)
    log_p_student = F.log_softmax(student_flat / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_flat / temperature, dim=-1)
    kl_rows = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(dim=-1)
    kl = (kl_rows * scored).sum() / scored.sum().clamp_min(1.0)
    ce = F.cross_entropy(student_flat, targets_flat, ignore_index=ignore_index) if alpha < 1.0 else kl.new_zeros(())
    return alpha * temperature**2 * kl + (1.0 - alpha) * ce


def anneal(start: float, end: float, progress: float, *, shape: Literal["linear", "cosine"]) -> float:
    """A value annealed from ``start`` to ``end`` as training ``progress`` goes from 0 to 1.

    * linear: ``v = v₀ + (v₁ − v₀)·p``
    * cosine: ``v = v₁ + (v₀ − v₁)·(1 + cos(π·p))/2`` (flat at both ends)

    Used for the logit temperature: a high ``T`` early transfers the teacher's "dark
    knowledge" about wrong classes, a low ``T`` late sharpens towards its decisions.

    Args:
        start: ``v₀``, the value at ``p = 0``.
        end: ``v₁``, the value at ``p = 1``.
        progress: ``p``, clipped to [0, 1].
        shape: ``linear`` or ``cosine``.
    """
    p = min(max(progress, 0.0), 1.0)
    if shape == "linear":
        return start + (end - start) * p
    if shape == "cosine":
        return end + (start - end) * (1.0 + math.cos(math.pi * p)) / 2.0
    raise ValueError(f"unknown anneal shape {shape!r}; use 'linear' or 'cosine'")


# --------------------------------------------------------------------------- hints (FitNets)


def hint_loss(student: Tensor, teacher: Tensor, adapter: nn.Module | None = None) -> Tensor:
    """FitNets hint loss (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets").

    ``L = mean((r(u_s) − u_t)²)``

    with ``u_s`` the student's guided layer, ``u_t`` the teacher's hint layer and ``r`` the
    learned regressor (``adapter``; identity when ``None``). The paper's ``½‖·‖²`` summed
    over elements is averaged here, so the weight does not depend on the feature size.

    Raises:
        ValueError: the adapted student feature and the teacher's differ in shape.
    """
    mapped = adapter(student) if adapter is not None else student
    if mapped.shape != teacher.shape:
        raise ValueError(f"hint: student feature {tuple(mapped.shape)} does not match teacher {tuple(teacher.shape)}")
    return F.mse_loss(mapped, teacher.detach())


class HintLoss(nn.Module):
    """`hint_loss` with its learned adapter (`make_adapter`): built from the two features' shapes.

    Args:
        student_shape: the student feature's shape, batch first.
        teacher_shape: the teacher feature's shape, batch first.
        name: how error messages call this pair.
        adapt: learn an adapter when the widths differ; without it they must be equal.

    Raises:
        spiralkit.distill.taps.DistillError: shapes no adapter can bridge (or differing at all
            with ``adapt=False``).
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], *, name: str = "hint",
                 adapt: bool = True) -> None:
        super().__init__()
        if not adapt and tuple(student_shape) != tuple(teacher_shape):
            raise DistillError(f"{name}: student feature {tuple(student_shape)} and teacher feature "
                               f"{tuple(teacher_shape)} differ and adapters are off")
        self.adapter = make_adapter(student_shape, teacher_shape, name=name)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """The hint loss of one batch."""
        return hint_loss(student, teacher, self.adapter)


class LayerMapLoss(nn.Module):
    """Layer-wise distillation over a layer map: ``L = Σ_(i→j) mean((a_i(S_i) − T_j)²)``.

    Student layer ``i`` is matched to teacher layer ``j`` for each pair of the map, through
    a learned adapter ``a_i`` when their widths differ (as in FitNets, one per pair).

    Args:
        shapes: ``(student_shape, teacher_shape)`` of each pair, batch first.
        names: how error messages call each pair.
        adapt: learn adapters when widths differ; without them shapes must be equal.
    """

    def __init__(self, shapes: Sequence[tuple[Sequence[int], Sequence[int]]], *, names: Sequence[str],
                 adapt: bool = True) -> None:
        super().__init__()
        self.pairs = nn.ModuleList(
            HintLoss(s, t, name=name, adapt=adapt) for (s, t), name in zip(shapes, names, strict=True)
        )

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        """The summed per-pair losses of one batch."""
        return torch.stack([pair(s, t) for pair, s, t in zip(self.pairs, student, teacher, strict=True)]).sum()


# --------------------------------------------------------------------------- attention transfer


def attention_map(features: Tensor, *, p: float = 2.0) -> Tensor:
    """Spatial attention map of conv features (Zagoruyko & Komodakis 2017).

    ``Q = vec(mean_c |A_c|^p) / ‖vec(mean_c |A_c|^p)‖₂`` for ``A`` of shape (B, C, H, W),
    giving (B, H·W); averaging over channels makes maps of layers of different widths comparable.
    """
    if features.ndim < 3:
        raise ValueError(f"attention transfer needs (B, C, H, W) features, got {tuple(features.shape)}")
    return F.normalize(features.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def attention_transfer_loss(student: Tensor, teacher: Tensor, *, p: float = 2.0) -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017, "Paying More Attention to Attention").

    ``L = mean((Q_s − Q_t)²)`` over batch and positions, with ``Q`` the normalised
    `attention_map`; this is the authors' code (their paper writes ``β/2·‖Q_s − Q_t‖_p``
    with ``β = 1000`` per layer pair: put ``β/2`` into the term's weight). Channels may
    differ; the spatial sizes must match.

    Raises:
        ValueError: the spatial sizes differ.
    """
    if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(
            f"attention transfer: spatial sizes differ, student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}"
        )
    return (attention_map(student, p=p) - attention_map(teacher.detach(), p=p)).pow(2).mean()


# --------------------------------------------------------------------------- MiniLM


def _masked_distribution(probs: Tensor, key_mask: Tensor | None) -> Tensor:
    """``probs`` restricted to real keys and renormalised over them."""
    if key_mask is None:
        return probs
    kept = probs * key_mask[:, None, None, :].to(probs.dtype)
    return kept / kept.sum(dim=-1, keepdim=True).clamp_min(_EPS)


def attention_probs_loss(student: Tensor, teacher: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """MiniLM self-attention distribution transfer (Wang et al. 2020, "MiniLM").

    ``L = 1/(B·A_h·|x|) Σ_b Σ_a Σ_t KL(A^T_{b,a,t} ‖ A^S_{b,a,t})``

    over batch ``b``, heads ``a`` and real query positions ``t``; each row ``A_{b,a,t}`` is a
    distribution over keys. With a padding ``mask`` both distributions are restricted to the
    real keys (and renormalised), and padded query rows are left out, so whatever the models
    put at padded positions does not change the loss.

    Args:
        student: attention probabilities (B, heads, queries, keys).
        teacher: same shape; treated as a constant.
        mask: (B, keys), true/1 at real tokens; also masks queries when queries == keys.

    Raises:
        ValueError: shapes differ (MiniLM needs as many heads in the student as the teacher).
    """
    if student.shape != teacher.shape or student.ndim != 4:
        raise ValueError(
            f"attention probabilities must both be (B, heads, queries, keys) and equal, "
            f"got student {tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    key_mask = None if mask is None else mask.to(torch.bool)
    p_t = _masked_distribution(teacher.detach(), key_mask)
    p_s = _masked_distribution(student, key_mask)
    kl_rows = (torch.xlogy(p_t, p_t) - p_t * p_s.clamp_min(_EPS).log()).sum(dim=-1)  # (B, heads, queries)
    if key_mask is None or student.shape[2] != student.shape[3]:
        return kl_rows.mean()
    rows = key_mask[:, None, :].to(kl_rows.dtype).expand_as(kl_rows)
    return (kl_rows * rows).sum() / rows.sum().clamp_min(1.0)


def value_relation(values: Tensor, *, heads: int, mask: Tensor | None = None) -> Tensor:
    """MiniLM value relation ``VR = softmax(V·Vᵀ/√d_r)`` per relation head.

    Args:
        values: (B, L, D) value vectors (the output of a layer's value projection).
        heads: relation heads ``D`` is split into (``d_r = D / heads``).
        mask: (B, L), true at real tokens: padded keys get no probability.

    Returns:
        (B, heads, L, L) distributions over keys.
    """
    batch, length, width = values.shape
    if width % heads:
        raise ValueError(f"value width {width} is not divisible by {heads} relation heads")
    v = values.reshape(batch, length, heads, width // heads).transpose(1, 2)
    scores = v @ v.transpose(-1, -2) / math.sqrt(width // heads)
    if mask is not None:
        scores = scores.masked_fill(~mask.to(torch.bool)[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1)


def value_relation_loss(student: Tensor, teacher: Tensor, *, heads: int, mask: Tensor | None = None) -> Tensor:
    """MiniLM value-relation transfer: ``KL(VR_T ‖ VR_S)`` averaged like `attention_probs_loss`.

    Relation heads (MiniLMv2, Wang et al. 2021) let student and teacher value widths differ:
    both are split into the same number of heads.
    """
    return attention_probs_loss(
        value_relation(student, heads=heads, mask=mask), value_relation(teacher.detach(), heads=heads, mask=mask),
        mask=mask,
    )


# --------------------------------------------------------------------------- CRD


def info_nce(anchors: Tensor, candidates: Tensor, *, temperature: float) -> Tensor:
    """InfoNCE with in-batch negatives: ``−1/B Σ_i log(exp(a_i·c_i/τ) / Σ_j exp(a_i·c_j/τ))``.

    Row ``i`` of ``candidates`` is the positive of anchor ``i``; every other row is a negative.
    """
    logits = anchors @ candidates.transpose(0, 1) / temperature
    return F.cross_entropy(logits, torch.arange(anchors.shape[0], device=anchors.device))


class CRDLoss(nn.Module):
    """Contrastive representation distillation (Tian, Krishnan & Isola 2020, "Contrastive
    Representation Distillation"), with in-batch negatives.

    ``z_s = normalize(W_s·h_s)``, ``z_t = normalize(W_t·h_t)``,
    ``L = InfoNCE(z_s → z_t) + InfoNCE(z_t → z_s)``

    The paper's two contrastive terms (student as anchor against teacher embeddings, and the
    reverse) with learned linear embeddings ``W_s, W_t``; its memory bank of 16,384
    negatives is replaced by the other examples of the batch, so larger batches give more
    negatives. Features are flattened to (B, D).

    Args:
        student_dim: width of the flattened student feature.
        teacher_dim: width of the flattened teacher feature.
        dim: width of the shared embedding.
        temperature: ``τ`` of InfoNCE (the paper uses 0.07).
    """

    def __init__(self, student_dim: int, teacher_dim: int, *, dim: int = 128, temperature: float = 0.07) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.student_proj = nn.Linear(student_dim, dim)
        self.teacher_proj = nn.Linear(teacher_dim, dim)
        self.temperature = temperature

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """The contrastive loss of one batch of (B, …) features."""
        z_s = F.normalize(self.student_proj(student.flatten(1)), dim=1)
        z_t = F.normalize(self.teacher_proj(teacher.detach().flatten(1)), dim=1)
        return info_nce(z_s, z_t, temperature=self.temperature) + info_nce(z_t, z_s, temperature=self.temperature)


# --------------------------------------------------------------------------- combining


def weighted_sum(values: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``Σ_k w_k·L_k``: the total of several distillation terms."""
    if not values or len(values) != len(weights):
        raise ValueError(f"need as many weights as losses (at least one), got {len(weights)} and {len(values)}")
    return torch.stack([w * v for v, w in zip(values, weights, strict=True)]).sum()
