"""Logit distillation of per-token predictions (causal LMs): every token is one prediction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spiralkit.distill import kd_loss
from spiralkit.models.causal_lm import tiny_llama
from spiralkit.tasks import Perplexity


def _per_example(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, alpha: float, t: float) -> torch.Tensor:
    """The classifier formula for one prediction, written out: α·T²·KL(p_t ‖ p_s) + (1−α)·CE."""
    p_t = F.softmax(teacher / t, dim=-1)
    kl = (p_t * (F.log_softmax(teacher / t, dim=-1) - F.log_softmax(student / t, dim=-1))).sum()
    ce = -F.log_softmax(student, dim=-1)[y]
    return alpha * t * t * kl + (1 - alpha) * ce


def _tiny_lms() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    kwargs = {"vocab_size": 32, "hidden_size": 16, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate_size": 32}
    return tiny_llama(**kwargs), tiny_llama(**kwargs).eval()


def test_kd_on_a_tiny_causal_lm_is_the_per_token_mean() -> None:
    student, teacher = _tiny_lms()
    x = torch.randint(0, 32, (3, 7))
    y = torch.randint(0, 32, (3, 7))
    with torch.no_grad():
        z_t = teacher(x)
    z_s = student(x)
    assert z_s.shape == (3, 7, 32)
    loss = kd_loss(z_s, z_t, y, alpha=0.7, temperature=2.0)
    direct = torch.stack([_per_example(z_s[b, i], z_t[b, i], y[b, i], 0.7, 2.0)
                          for b in range(3) for i in range(7)]).mean()
    assert loss.item() == pytest.approx(direct.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_kd_cross_entropy_part_is_the_perplexity_tasks_loss() -> None:
    student, teacher = _tiny_lms()
    x, y = torch.randint(0, 32, (2, 5)), torch.randint(0, 32, (2, 5))
    with torch.no_grad():
        z_s, z_t = student(x), teacher(x)
    assert kd_loss(z_s, z_t, y, alpha=0.0, temperature=3.0).item() == pytest.approx(Perplexity().loss(z_s, y).item())


def test_kd_leaves_out_ignored_tokens() -> None:
    torch.manual_seed(1)
    z_s, z_t = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    y = torch.randint(0, 6, (2, 4))
    y[0, 3] = -100
    y[1, 0] = -100
    loss = kd_loss(z_s, z_t, y, alpha=0.4, temperature=1.5)
    kept = [(b, i) for b in range(2) for i in range(4) if y[b, i] != -100]
    direct = torch.stack([_per_example(z_s[b, i], z_t[b, i], y[b, i], 0.4, 1.5) for b, i in kept]).mean()
    assert loss.item() == pytest.approx(direct.item(), rel=1e-5)
    y[0, 3] = 2  # scoring that position changes the loss: it was left out
    assert kd_loss(z_s, z_t, y, alpha=0.4, temperature=1.5).item() != pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize(("student", "teacher", "targets", "message"), [
    ((2, 4, 6), (2, 4, 5), (2, 4), "teacher logits"),
    ((2, 4, 6), (2, 4, 6), (2, 3), "targets"),
    ((2, 4, 6), (2, 4, 6), (8,), "targets"),
])
def test_kd_shape_mismatch_names_the_argument(student: tuple, teacher: tuple, targets: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kd_loss(torch.zeros(student), torch.zeros(teacher), torch.zeros(targets, dtype=torch.long),
                alpha=0.5, temperature=2.0)


def test_the_spirals_distillation_objective_runs_on_a_causal_lm() -> None:
    from spiralkit.modules import freeze
    from spiralkit.spiral.recovery import Distill

    student, teacher = _tiny_lms()
    config = Distill(losses=["logits"], alpha=0.8, temperature=3.0)
    objective = config.objective(task=Perplexity(), teacher=freeze(teacher))
    x, y = torch.randint(0, 32, (2, 6)), torch.randint(0, 32, (2, 6))
    loss = objective(student, x, y)
    with torch.no_grad():
        z_t = teacher(x)
    direct = torch.stack([_per_example(student(x)[b, i], z_t[b, i], y[b, i], 0.8, 3.0)
                          for b in range(2) for i in range(6)]).mean()
    assert loss.item() == pytest.approx(direct.item(), rel=1e-5)
    loss.backward()
    assert student.llm.model.layers[0].mlp.down_proj.weight.grad is not None
