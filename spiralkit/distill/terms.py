"""Distillation loss terms as recipe configs, and the objective that sums them.

A recipe lists the terms of its distillation loss; each is a typed config chosen by
``kind`` and weighted by ``weight``::

    recover:
      kind: distill
      losses:
        - {kind: logits}                                  # α·T²·KL + (1−α)·CE, α and T from above
        - {kind: hint, student: fc1, teacher: fc1, weight: 0.5}
        - {kind: layers, map: [[fc1, fc1], [fc2, fc2]], weight: 0.1}

Each term is one `Term` class that owns its taps (`Term.tap_pairs`), its learned part
(`Term.build`) and its loss (`Term.compute`); `LOSS_TERMS` lists the kinds a recipe can
name, and `LossTerm`, the type of a recipe's ``losses``, is built from it.

`DistillObjective` runs the frozen teacher (through a `TeacherCache` when given) and the
student with feature taps, and returns ``Σ_k w_k·L_k``. The learned parts of the terms
(adapters, CRD projections) are built from the first batch's shapes by `prepare` and
exposed by `parameters`, which `spiralkit.train.train` adds to its optimizer; they live in
the objective, never in the student.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from spiralkit.configs import KindTable, by_kind
from spiralkit.distill.cache import TeacherCache
from spiralkit.distill.losses import (
    CRDLoss,
    HintLoss,
    LayerMapLoss,
    anneal,
    attention_probs_loss,
    attention_transfer_loss,
    kd_loss,
    value_relation_loss,
)
from spiralkit.distill.taps import DistillError, FeatureTaps, Tap, TapSpec, capture, tap_key

__all__ = [
    "AttentionProbsTerm",
    "AttentionTransferTerm",
    "CRDTerm",
    "DistillObjective",
    "HintTerm",
    "LOSS_TERMS",
    "LayersTerm",
    "LogitsTerm",
    "LossTerm",
    "OutputsTerm",
    "TemperatureSchedule",
    "Term",
    "TermBatch",
]

_OUTPUT = "<output>"  # the teacher's logits among its cached tensors (no module name has '<')


class TemperatureSchedule(BaseModel):
    """Logit temperature annealed over training, from ``start`` to ``end`` (see `anneal`).

    Attributes:
        shape: ``linear`` or ``cosine``.
        start: temperature at the first step.
        end: temperature at the last step.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    shape: Literal["linear", "cosine"] = "linear"
    start: float = Field(gt=0)
    end: float = Field(gt=0)

    def at(self, progress: float) -> float:
        """The temperature at training ``progress`` in [0, 1]."""
        return anneal(self.start, self.end, progress, shape=self.shape)


@dataclass(frozen=True)
class TermBatch:
    """One batch as the terms see it: inputs, labels, outputs and tapped features of both models."""

    x: Any
    y: Tensor | None
    student_output: Tensor
    teacher_output: Tensor
    student: Mapping[str, Tensor]
    teacher: Mapping[str, Tensor]

    def pair(self, student: Tap, teacher: Tap) -> tuple[Tensor, Tensor]:
        """The student's and the teacher's features at two taps."""
        return self.student[tap_key(student)], self.teacher[tap_key(teacher)]


class Term(BaseModel):
    """A loss term: a weight in the sum, the taps it compares, its learned part and its loss.

    A new term is a subclass with a ``kind`` literal that overrides `compute` (and `tap_pairs`,
    `build` where it taps features or learns), plus one line in `LOSS_TERMS`.

    Attributes:
        weight: ``w_k`` of the term in ``Σ_k w_k·L_k``.
        kind: the term's name in `LOSS_TERMS` (a literal in each subclass).
        learns: whether `build` may return a learned module (`DistillObjective.prepare` then
            runs a batch to build it).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    learns: ClassVar[bool] = False
    weight: float = Field(default=1.0, ge=0)
    kind: str  # each term's literal; after weight, where the fields have always been

    def tap_pairs(self) -> list[tuple[Tap, Tap]]:
        """The (student, teacher) taps the term compares (none: it compares outputs)."""
        return []

    def build(self, batch: TermBatch) -> nn.Module | None:
        """The learned module of the term (``None`` if it has none), sized from one batch; checks shapes.

        Raises:
            DistillError: the batch's features do not fit the term.
        """
        return None

    def compute(self, batch: TermBatch, learned: nn.Module | None, *, alpha: float, temperature: float) -> Tensor:
        """``L_k`` on one batch.

        Args:
            batch: the batch's outputs and tapped features.
            learned: what `build` returned.
            alpha: the objective's default ``α`` (for logit terms).
            temperature: the objective's current default temperature (for logit terms).
        """
        raise NotImplementedError(f"loss term {self.kind!r} defines no loss")

    def _name(self, student: Tap, teacher: Tap) -> str:
        return f"{self.kind} {tap_key(student)!r} -> {tap_key(teacher)!r}"

    def _check_same_outputs(self, batch: TermBatch) -> None:
        if batch.student_output.shape != batch.teacher_output.shape:
            raise DistillError(f"{self.kind}: student outputs {tuple(batch.student_output.shape)} and teacher "
                               f"outputs {tuple(batch.teacher_output.shape)} differ")


class _PairTerm(Term):
    """A term comparing one student tap with one teacher tap."""

    student: TapSpec
    teacher: TapSpec

    def tap_pairs(self) -> list[tuple[Tap, Tap]]:
        return [(self.student, self.teacher)]


class LogitsTerm(Term):
    """Hinton logit distillation with cross-entropy on labels (`kd_loss`).

    Attributes:
        alpha: weight of the KL part against cross-entropy (``None``: the recovery's ``alpha``).
        temperature: ``T`` (``None``: the recovery's temperature, or its schedule).
    """

    kind: Literal["logits"] = "logits"
    alpha: float | None = Field(default=None, ge=0, le=1)
    temperature: float | None = Field(default=None, gt=0)

    def build(self, batch: TermBatch) -> nn.Module | None:
        self._check_same_outputs(batch)
        return None

    def compute(self, batch: TermBatch, learned: nn.Module | None, *, alpha: float, temperature: float) -> Tensor:
        if batch.y is None:
            raise DistillError("logits: the term needs labels y")
        return kd_loss(batch.student_output, batch.teacher_output, batch.y,
                       alpha=alpha if self.alpha is None else self.alpha,
                       temperature=temperature if self.temperature is None else self.temperature)


class HintTerm(_PairTerm):
    """FitNets hint (`HintLoss`): MSE between a student layer, through a learned adapter when
    the widths differ, and a teacher layer."""

    learns: ClassVar[bool] = True
    kind: Literal["hint"] = "hint"

    def build(self, batch: TermBatch) -> nn.Module | None:
        s, t = batch.pair(self.student, self.teacher)
        return HintLoss(s.shape, t.shape, name=self._name(self.student, self.teacher))

    def compute(self, batch: TermBatch, learned: nn.Module | None, *, alpha: float, temperature: float) -> Tensor:
        assert learned is not None
        return learned(*batch.pair(self.student, self.teacher))


class AttentionTransferTerm(_PairTerm):
    """Attention transfer (`attention_transfer_loss`) between two conv features of equal spatial size."""

    kind: Literal["attention_transfer"] = "attention_transfer"
    p: float = Field(default=2.0, gt=0)

    def build(self, batch: TermBatch) -> nn.Module | None:
        s, t = batch.pair(self.student, self.teacher)
        if s.ndim != 4 or t.ndim != 4 or s.shape[2:] != t.shape[2:]:
            raise DistillError(f"{self._name(self.student, self.teacher)}: needs (B, C, H, W) features of equal "
                               f"H, W; got student {tuple(s.shape)} and teacher {tuple(t.shape)}")
        return None

    def compute(self, batch: TermBatch, learned: nn.Module | None, *, alpha: float, temperature: float) -> Tensor:
        return attention_transfer_loss(*batch.pair(self.student, self.teacher), p=self.p)


class AttentionProbsTerm(_PairTerm):
    """MiniLM attention-distribution transfer (`attention_probs_loss`), optionally with value relations.

    Attributes:
        student: tap giving the student's attention probabilities (B, heads, L, L), e.g.
            ``{module: encoder.layer.3.attention.self, index: 1}`` for a Hugging Face layer.
        teacher: the same for the teacher (same number of heads).
        pad_token: token id of padding in (B, L) token-id inputs: padded keys and queries
            are masked. Packed (B, 2, L) inputs (``[input_ids; attention_mask]``, spiralkit's
            Hugging Face models) are masked by their attention mask without it.
        values: ``[student tap, teacher tap]`` of value projections (B, L, D): adds
            `value_relation_loss` (MiniLM's second term).
        value_heads: relation heads of the value term (default: the attention's heads).
    """

    kind: Literal["attention_probs"] = "attention_probs"
    pad_token: int | None = None
    values: tuple[TapSpec, TapSpec] | None = None
    value_heads: int | None = Field(default=None, gt=0)

    def tap_pairs(self) -> list[tuple[Tap, Tap]]:
        return [(self.student, self.teacher), *([self.values] if self.values else [])]

    def build(self, batch: TermBatch) -> nn.Module | None:
        s, t = batch.pair(self.student, self.teacher)
        if s.shape != t.shape or s.ndim != 4:
            raise DistillError(f"{self._name(self.student, self.teacher)}: needs equal (B, heads, L, L) attention "
                               f"probabilities; got student {tuple(s.shape)} and teacher {tuple(t.shape)}")
        if self.values is not None:
            vs, vt = batch.pair(*self.values)
            heads = self.value_heads or t.shape[1]
            if vs.ndim != 3 or vt.ndim != 3 or vs.shape[-1] % heads or vt.shape[-1] % heads:
                raise DistillError(f"{self._name(*self.values)}: needs (B, L, D) values with D divisible by "
                                   f"{heads} heads; got student {tuple(vs.shape)} and teacher {tuple(vt.shape)}")
        self._padding_mask(batch.x, t.shape[-1])
        return None

    def compute(self, batch: TermBatch, learned: nn.Module | None, *, alpha: float, temperature: float) -> Tensor:
        s, t = batch.pair(self.student, self.teacher)
        mask = self._padding_mask(batch.x, t.shape[-1])
        loss = attention_probs_loss(s, t, mask=mask)
        if self.values is not None:
            loss = loss + value_relation_loss(*batch.pair(*self.values), heads=self.value_heads or t.shape[1],
                                              mask=mask)
        return loss

    def _padding_mask(self, x: Any, length: int | None = None) -> Tensor | None:
        """Which tokens are real: from packed ``[input_ids; attention_mask]`` rows, or from ``pad_token``.

        ``length`` crops the mask to the attention's sequence length (models that trim
        all-padding columns per batch attend over fewer positions than the input has).
        """
        if isinstance(x, Tensor) and x.ndim == 3 and x.shape[1] == 2 and not x.is_floating_point():
            return x[:, 1, :length].bool()
        if self.pad_token is None:
            return None
        if not isinstance(x, Tensor) or x.ndim != 2 or x.is_floating_point():
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise DistillError(f"attention_probs: pad_token needs token ids (B, L) as inputs, got {shape}")
        return x != self.pad_token


class CRDTerm(_PairTerm):
    """Contrastive representation distillation (`CRDLoss`) with in-batch negatives.

    Attributes:
        dim: width of the learned shared embedding.
        temperature: InfoNCE temperature ``τ``.
    """

    learns: ClassVar[bool] = True
    kind: Literal["crd"] = "crd"
    dim: int = Field(default=128, gt=0)
    temperature: float = Field(default=0.07, gt=0)

    def build(self, batch: TermBatch) -> nn.Module | None:
        s, t = batch.pair(self.student, self.teacher)
        return CRDLoss(s[0].numel(), t[0].numel(), dim=self.dim, temperature=self.temperature)

    def compute(self, batch: TermBatch, learned: nn.Module | None, *, alpha: float, temperature: float) -> Tensor:
        assert learned is not None
        return learned(*batch.pair(self.student, self.teacher))


class LayersTerm(Term):
    """Layer-wise distillation (`LayerMapLoss`): MSE per ``[student, teacher]`` pair of ``map``.

    Attributes:
        map: pairs of student and teacher layers (taps).
        adapt: learn adapters where widths differ; without, shapes must match.
    """

    learns: ClassVar[bool] = True
    kind: Literal["layers"] = "layers"
    map: tuple[tuple[TapSpec, TapSpec], ...] = Field(min_length=1)
    adapt: bool = True

    def tap_pairs(self) -> list[tuple[Tap, Tap]]:
        return list(self.map)

    def build(self, batch: TermBatch) -> nn.Module | None:
        shapes = [tuple(tuple(f.shape) for f in batch.pair(s, t)) for s, t in self.map]
        names = [f"layers pair {i} ({tap_key(s)!r} -> {tap_key(t)!r})" for i, (s, t) in enumerate(self.map)]
        return LayerMapLoss(shapes, names=names, adapt=self.adapt)  # type: ignore[arg-type]

    def compute(self, batch: TermBatch, learned: nn.Module | None, *, alpha: float, temperature: float) -> Tensor:
        assert learned is not None
        pairs = [batch.pair(s, t) for s, t in self.map]
        return learned([s for s, _ in pairs], [t for _, t in pairs])


class OutputsTerm(Term):
    """Match the teacher's outputs directly: embeddings, or logits by regression.

    ``cosine``: ``mean(1 − cos(s, t))`` over the last dimension — for sentence embeddings,
    whose fidelity is their cosine to the original's (the loss of Sentence-BERT-style
    embedding distillation, Reimers & Gurevych 2020). ``mse``: ``mean((s − t)²)``.
    Needs no labels, so a student learns from unlabeled inputs.

    Attributes:
        loss: ``cosine`` or ``mse``.
    """

    kind: Literal["outputs"] = "outputs"
    loss: Literal["cosine", "mse"] = "cosine"

    def build(self, batch: TermBatch) -> nn.Module | None:
        self._check_same_outputs(batch)
        return None

    def compute(self, batch: TermBatch, learned: nn.Module | None, *, alpha: float, temperature: float) -> Tensor:
        student, teacher = batch.student_output, batch.teacher_output.detach()
        if self.loss == "mse":
            return F.mse_loss(student, teacher)
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()


LOSS_TERMS: dict[str, type[Term]] = by_kind(
    LogitsTerm,
    HintTerm,
    AttentionTransferTerm,
    AttentionProbsTerm,
    CRDTerm,
    LayersTerm,
    OutputsTerm,
)
"""The loss terms a recipe can name, by ``kind``: a new term is a `Term` subclass and a line here."""

LossTerm = Annotated[Term, KindTable(LOSS_TERMS, what="loss term")]
"""A recipe field holding one of the `LOSS_TERMS`, chosen by its ``kind``."""


def _unique(taps: Sequence[Tap]) -> list[Tap]:
    return list({tap_key(t): t for t in taps}.values())


def _logits(output: Any) -> Tensor:
    """A model's logits: the output itself, its ``logits`` field (Hugging Face), or its first element."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise DistillError(f"cannot find logits in a model output of type {type(output).__name__}")


# --------------------------------------------------------------------------- the objective


class DistillObjective:
    """``objective(model, x, y) = Σ_k w_k·L_k``: the distillation terms of a recipe, summed.

    Besides being called like any objective, it offers what `spiralkit.train.train` looks for:
    ``prepare(model, x)`` (build adapters/projections from one batch), ``parameters()``
    (theirs, to train with the student) and ``set_progress(fraction)`` (for the temperature
    schedule).

    Args:
        teacher: the frozen teacher (eval mode, no gradients).
        terms: the loss terms.
        alpha: ``α`` of logits terms that do not set their own.
        temperature: ``T`` of logits terms that do not set their own, or a schedule of it.
        cache: where teacher outputs are kept across epochs (``None``: run it every batch).
        owns_cache: `close` also closes ``cache`` (leave false for a cache shared with others).

    Raises:
        DistillError: a teacher tap names no module of ``teacher`` (student taps are checked
            at the first batch).
    """

    def __init__(self, teacher: nn.Module, terms: Sequence[LossTerm], *, alpha: float,
                 temperature: float | TemperatureSchedule, cache: TeacherCache | None = None,
                 owns_cache: bool = False) -> None:
        if not terms:
            raise DistillError("a distillation objective needs at least one loss term")
        self.teacher = teacher
        self.terms = tuple(terms)
        self.alpha = alpha
        self.temperature = temperature
        self.cache = cache
        self._owns_cache = owns_cache
        pairs = [pair for term in self.terms for pair in term.tap_pairs()]
        self._student_taps = _unique([s for s, _ in pairs])
        self._teacher_taps = _unique([t for _, t in pairs])
        FeatureTaps(teacher, self._teacher_taps, role="teacher")  # names checked now
        self.learned = nn.ModuleDict()
        self._learns = any(term.learns for term in self.terms)
        self._built = False
        self._progress = 0.0
        self.last_terms: dict[str, float] = {}

    # ------------------------------------------------------------------ what train() uses

    def parameters(self) -> Iterator[nn.Parameter]:
        """The learned parameters of the terms (adapters, projections); empty before `prepare`."""
        return self.learned.parameters()

    def set_progress(self, fraction: float) -> None:
        """Tell the objective how far training is (0 → 1), for the temperature schedule."""
        self._progress = fraction

    def prepare(self, model: nn.Module, x: Any) -> None:
        """Build the terms' learned parts from one batch's shapes (no-op once built, or with none).

        The student runs in eval mode without gradients, so BatchNorm statistics do not move.
        """
        if self._built or not self._learns:
            return
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                self._build(self._batch(model, x, None))
        finally:
            model.train(was_training)

    def __call__(self, model: nn.Module, x: Any, y: Tensor) -> Tensor:
        batch = self._batch(model, x, y)
        if not self._built and self._learns:
            warnings.warn(
                "distillation terms built at the first call: call objective.prepare(model, x) before building the "
                "optimizer and add objective.parameters() to it, or their adapters stay untrained",
                stacklevel=2,
            )
        if not self._built:
            self._build(batch)
        values = [
            term.compute(batch, self.learned[str(i)] if str(i) in self.learned else None,
                         alpha=self.alpha, temperature=self.current_temperature)
            for i, term in enumerate(self.terms)
        ]
        self.last_terms = {f"{i}:{term.kind}": float(v.detach()) for i, (term, v) in enumerate(zip(self.terms, values))}
        return torch.stack([term.weight * value for term, value in zip(self.terms, values, strict=True)]).sum()

    @property
    def current_temperature(self) -> float:
        """The default logit temperature at the current training progress."""
        if isinstance(self.temperature, TemperatureSchedule):
            return self.temperature.at(self._progress)
        return self.temperature

    def close(self) -> None:
        """Release the teacher cache (memory and spill files) when this objective owns it."""
        if self.cache is not None and self._owns_cache:
            self.cache.close()

    # ------------------------------------------------------------------ internals

    def _teacher_outputs(self, x: Any) -> dict[str, Tensor]:
        def run(rows: Any) -> dict[str, Tensor]:
            with torch.no_grad():
                output, features = capture(self.teacher, rows, self._teacher_taps, role="teacher")
            return {_OUTPUT: _logits(output), **features}

        return self.cache.fetch(x, run) if self.cache is not None else run(x)

    def _batch(self, model: nn.Module, x: Any, y: Tensor | None) -> TermBatch:
        teacher = self._teacher_outputs(x)
        output, student = capture(model, x, self._student_taps, role="student") if self._student_taps else (model(x), {})
        return TermBatch(x=x, y=y, student_output=_logits(output), teacher_output=teacher.pop(_OUTPUT),
                      student=student, teacher=teacher)

    def _build(self, batch: TermBatch) -> None:
        for index, term in enumerate(self.terms):
            module = term.build(batch)
            if module is not None:
                reference = batch.student_output  # adapters follow the student's device and float dtype
                dtype = reference.dtype if reference.is_floating_point() else None
                self.learned[str(index)] = module.to(device=reference.device, dtype=dtype)
        self._built = True
