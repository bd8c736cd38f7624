"""Learned adapters that map a student feature to its teacher's width.

FitNets (Romero et al. 2015) call them *regressors*: a thin student layer cannot be compared
with a wide teacher layer until a learned map takes the one to the other's width. Adapters
belong to the distillation objective, never to the student, so a saved student stays the
plain model.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from spiralkit.distill.taps import DistillError

__all__ = ["make_adapter"]


def make_adapter(student_shape: Sequence[int], teacher_shape: Sequence[int], *, name: str) -> nn.Module:
    """The module mapping a student feature of ``student_shape`` onto ``teacher_shape``.

    * equal shapes: ``nn.Identity`` (nothing to learn);
    * ``(B, C, H, W)`` features with the same ``H, W``: a 1x1 ``nn.Conv2d`` from ``C_s`` to ``C_t``;
    * ``(B, …, C)`` features equal but for the last dimension: ``nn.Linear(C_s, C_t)``.

    Args:
        student_shape: shape of the student's feature, batch first.
        teacher_shape: shape of the teacher's feature, batch first.
        name: how an error message names the pair (e.g. ``"hint fc1 -> fc2"``).

    Raises:
        DistillError: the shapes differ in more than the width, which no adapter bridges.
    """
    s, t = tuple(student_shape), tuple(teacher_shape)
    if s == t:
        return nn.Identity()
    if len(s) == len(t) == 4 and s[0] == t[0] and s[2:] == t[2:]:
        return nn.Conv2d(s[1], t[1], kernel_size=1)
    if len(s) == len(t) >= 2 and s[:-1] == t[:-1]:
        return nn.Linear(s[-1], t[-1])
    raise DistillError(
        f"{name}: student feature {s} and teacher feature {t} differ in more than their width "
        "(the last dimension of (B, ..., C), or the channels of (B, C, H, W)); no adapter can bridge them"
    )
