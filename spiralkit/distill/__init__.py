"""Knowledge distillation: losses and the recovery step of the spiral."""

from spiralkit.distill.losses import kd_loss
from spiralkit.distill.recovery import Distill, Finetune, Recovery, distill, freeze, recovery_objective

__all__ = ["Distill", "Finetune", "Recovery", "distill", "freeze", "kd_loss", "recovery_objective"]
