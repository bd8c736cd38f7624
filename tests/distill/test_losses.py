"""Logit distillation loss against a value computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from spiralkit.distill import kd_loss


def test_kd_loss_hand_computed() -> None:
    student = torch.tensor([[1.0, 0.0]])
    teacher = torch.tensor([[0.0, 1.0]])
    y = torch.tensor([0])
    # T = 2: p_t = softmax([0, .5]), p_s = softmax([.5, 0]); log(p_t/p_s) = ∓0.5, so
    # KL = (p_t[1] − p_t[0])·0.5 with p_t[1] = σ(0.5).
    sig = 1 / (1 + math.exp(-0.5))
    kl = (sig - (1 - sig)) * 0.5
    ce = math.log(1 + math.exp(-1.0))
    expected = 0.5 * 4 * kl + 0.5 * ce
    assert expected == pytest.approx(0.401549, abs=1e-6)
    assert kd_loss(student, teacher, y, alpha=0.5, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_limits() -> None:
    student = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    ce = torch.nn.functional.cross_entropy(student, y)
    assert kd_loss(student, torch.randn(4, 3), y, alpha=0.0, temperature=3.0).item() == pytest.approx(ce.item())
    assert kd_loss(student, student.clone(), y, alpha=1.0, temperature=3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_gradient_does_not_reach_teacher() -> None:
    teacher = torch.randn(2, 3, requires_grad=True)
    student = torch.randn(2, 3, requires_grad=True)
    kd_loss(student, teacher, torch.tensor([0, 1]), alpha=0.7, temperature=2.0).backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize(("alpha", "temperature", "message"), [(1.5, 1.0, "alpha"), (0.5, 0.0, "temperature")])
def test_kd_loss_bad_arguments(alpha: float, temperature: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), alpha=alpha, temperature=temperature)


def test_distill_verb_moves_student_towards_teacher() -> None:
    from spiralkit.data import TensorLoader
    from spiralkit.distill import Distill
    from spiralkit.tasks import Classification
    from spiralkit.train import OptimizerConfig, TrainConfig
    from spiralkit import distill

    torch.manual_seed(0)
    teacher = torch.nn.Linear(4, 3)
    student = torch.nn.Linear(4, 3)
    x = torch.randn(256, 4)
    y = teacher(x).argmax(dim=1).detach()
    loader = TensorLoader(x, y, batch_size=32, shuffle=True)
    before = torch.nn.functional.mse_loss(student(x), teacher(x)).item()
    config = Distill(alpha=1.0, temperature=1.0, train=TrainConfig(epochs=20, optimizer=OptimizerConfig(lr=0.1)))
    distill(student, teacher, loader, config=config, task=Classification())
    after = torch.nn.functional.mse_loss(student(x), teacher(x)).item()
    assert after < before / 2
    assert not any(p.requires_grad for p in teacher.parameters()), "the teacher is frozen"
