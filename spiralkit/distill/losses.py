"""Distillation losses."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    *,
    alpha: float,
    temperature: float,
) -> Tensor:
    """Logit distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network").

    ``L = α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1−α)·CE(z_s, y)``

    The KL term is averaged over the batch; the ``T²`` factor keeps its gradients on the
    same scale as the cross-entropy's when the temperature changes.

    Args:
        student_logits: ``z_s``, shape (batch, classes).
        teacher_logits: ``z_t``, same shape; treated as a constant.
        targets: class indices ``y``, shape (batch,).
        alpha: weight of the distillation term, in [0, 1].
        temperature: softening temperature ``T > 0``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    ce = F.cross_entropy(student_logits, targets)
    return alpha * temperature**2 * kl + (1.0 - alpha) * ce
