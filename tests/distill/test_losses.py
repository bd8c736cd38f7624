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
    from spiralkit.spiral.recovery import Distill
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


# --------------------------------------------------------------------------- schedules, hints, adapters

from torch import nn  # noqa: E402

from spiralkit.distill import (  # noqa: E402
    CRDLoss,
    DistillError,
    HintLoss,
    LayerMapLoss,
    anneal,
    attention_map,
    attention_probs_loss,
    attention_transfer_loss,
    hint_loss,
    info_nce,
    make_adapter,
    value_relation,
    value_relation_loss,
    weighted_sum,
)


def test_anneal_linear_and_cosine() -> None:
    assert anneal(4.0, 1.0, 0.5, shape="linear") == pytest.approx(2.5)
    assert anneal(4.0, 1.0, 0.25, shape="linear") == pytest.approx(3.25)
    # cosine: 1 + 3·(1 + cos(π/4))/2 = 3.5607
    assert anneal(4.0, 1.0, 0.25, shape="cosine") == pytest.approx(1 + 3 * (1 + math.cos(math.pi / 4)) / 2)
    assert anneal(4.0, 1.0, 0.5, shape="cosine") == pytest.approx(2.5)
    assert anneal(4.0, 1.0, 2.0, shape="cosine") == pytest.approx(1.0), "progress is clipped to [0, 1]"
    with pytest.raises(ValueError, match="unknown anneal shape 'step'"):
        anneal(1.0, 2.0, 0.5, shape="step")  # type: ignore[arg-type]


def test_hint_loss_hand_computed() -> None:
    student, teacher = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]])
    assert hint_loss(student, teacher).item() == pytest.approx((1 + 4) / 2)
    adapter = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        adapter.weight.copy_(torch.tensor([[1.0, 1.0]]))  # r(u) = u1 + u2 = 3
    assert hint_loss(student, torch.tensor([[5.0]]), adapter).item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match=r"student feature \(1, 2\) does not match teacher \(1, 1\)"):
        hint_loss(student, torch.tensor([[5.0]]))


@pytest.mark.parametrize(
    ("student", "teacher", "kind", "weight"),
    [
        ((2, 8), (2, 16), nn.Linear, (16, 8)),
        ((2, 4, 8), (2, 4, 12), nn.Linear, (12, 8)),
        ((2, 3, 5, 5), (2, 6, 5, 5), nn.Conv2d, (6, 3, 1, 1)),
        ((2, 3, 5, 5), (2, 3, 5, 5), nn.Identity, None),
    ],
)
def test_adapter_shapes(student: tuple[int, ...], teacher: tuple[int, ...], kind: type, weight: tuple | None) -> None:
    adapter = make_adapter(student, teacher, name="pair")
    assert type(adapter) is kind
    if weight is not None:
        assert tuple(adapter.weight.shape) == weight
    assert tuple(adapter(torch.zeros(student)).shape) == teacher


@pytest.mark.parametrize(("student", "teacher"), [((2, 3, 5, 5), (2, 3, 4, 4)), ((2, 8), (2, 4, 8)), ((2, 3, 8), (2, 4, 8))])
def test_adapter_cannot_bridge_more_than_width(student: tuple[int, ...], teacher: tuple[int, ...]) -> None:
    with pytest.raises(DistillError, match=r"hint 'fc1' -> 'b': student feature .* differ in more than their width"):
        make_adapter(student, teacher, name="hint 'fc1' -> 'b'")


def test_hint_and_layer_map_modules() -> None:
    torch.manual_seed(0)
    hint = HintLoss((2, 3), (2, 5))
    assert isinstance(hint.adapter, nn.Linear) and sum(p.numel() for p in hint.parameters()) == 3 * 5 + 5
    with pytest.raises(DistillError, match=r"pair a: student feature \(2, 3\) and teacher feature \(2, 5\) differ and adapters are off"):
        HintLoss((2, 3), (2, 5), name="pair a", adapt=False)
    layers = LayerMapLoss([((1, 2), (1, 2)), ((1, 1), (1, 1))], names=["p0", "p1"])
    s = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0]])]
    t = [torch.tensor([[0.0, 4.0]]), torch.tensor([[1.0]])]
    assert layers(s, t).item() == pytest.approx(2.5 + 4.0)


# --------------------------------------------------------------------------- attention transfer


def test_attention_transfer_hand_computed() -> None:
    # student (1, 2, 1, 2): mean_c A² = [(1+1)/2, (0+4)/2] = [1, 2] → [1, 2]/√5
    student = torch.tensor([[[[1.0, 0.0]], [[1.0, 2.0]]]])
    # teacher (1, 1, 1, 2): [4, 4] → [1, 1]/√2; channels may differ
    teacher = torch.tensor([[[[2.0, 2.0]]]])
    assert attention_map(student)[0].tolist() == pytest.approx([1 / math.sqrt(5), 2 / math.sqrt(5)])
    expected = ((1 / math.sqrt(5) - 1 / math.sqrt(2)) ** 2 + (2 / math.sqrt(5) - 1 / math.sqrt(2)) ** 2) / 2
    assert attention_transfer_loss(student, teacher).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="spatial sizes differ"):
        attention_transfer_loss(student, torch.zeros(1, 1, 2, 2))


# --------------------------------------------------------------------------- MiniLM


def test_attention_probs_loss_hand_computed() -> None:
    teacher = torch.tensor([[[[0.5, 0.5], [0.9, 0.1]]]])
    student = torch.tensor([[[[0.25, 0.75], [0.5, 0.5]]]])
    row0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    row1 = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert attention_probs_loss(student, teacher).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert attention_probs_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match=r"got student \(1, 1, 2, 2\) and teacher \(1, 2, 2, 2\)"):
        attention_probs_loss(student, torch.zeros(1, 2, 2, 2))


def test_padded_keys_do_not_change_the_attention_loss() -> None:
    torch.manual_seed(0)
    real_t, real_s = torch.randn(1, 2, 3, 3).softmax(-1), torch.randn(1, 2, 3, 3).softmax(-1)
    reference = attention_probs_loss(real_s, real_t)
    mask = torch.tensor([[1, 1, 1, 0]])
    for junk in (0.0, 0.3):
        # Put the real rows into a padded length-4 batch; the padded key and query get junk.
        t = torch.full((1, 2, 4, 4), junk)
        s = torch.full((1, 2, 4, 4), 1 - junk)
        t[..., :3, :3], s[..., :3, :3] = real_t, real_s
        assert attention_probs_loss(s, t, mask=mask).item() == pytest.approx(reference.item(), rel=1e-6)


def test_value_relation_hand_computed_and_masked() -> None:
    values = torch.tensor([[[1.0], [2.0]]])  # V·Vᵀ = [[1, 2], [2, 4]], one head of width 1
    expected = torch.tensor([[1.0, 2.0], [2.0, 4.0]]).softmax(-1)
    assert torch.allclose(value_relation(values, heads=1)[0, 0], expected)
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    student = torch.tensor([[[1.0], [0.5], [-9.0]]])
    mask = torch.tensor([[True, True, False]])
    padded_elsewhere = student.clone()
    padded_elsewhere[0, 2] = 7.0
    a = value_relation_loss(student, teacher, heads=1, mask=mask)
    b = value_relation_loss(padded_elsewhere, teacher, heads=1, mask=mask)
    assert a.item() == pytest.approx(b.item()) and a.item() > 0
    assert value_relation_loss(teacher, teacher, heads=2).item() == pytest.approx(0.0, abs=1e-7)


# --------------------------------------------------------------------------- CRD


def test_info_nce_hand_computed() -> None:
    eye = torch.eye(2)  # each anchor matches its positive (score 1) and not the negative (score 0)
    assert info_nce(eye, eye, temperature=1.0).item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert info_nce(eye, eye, temperature=0.5).item() == pytest.approx(math.log(1 + math.exp(-2)))


def test_crd_loss_with_identity_projections() -> None:
    crd = CRDLoss(2, 2, dim=2, temperature=1.0)
    with torch.no_grad():
        for proj in (crd.student_proj, crd.teacher_proj):
            proj.weight.copy_(torch.eye(2))
            proj.bias.zero_()
    student = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # normalised: the identity
    teacher = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    assert crd(student, teacher).item() == pytest.approx(2 * math.log(1 + math.exp(-1)))
    projections = CRDLoss(8, 4 * 2 * 2, dim=3)
    assert projections.student_proj.weight.shape == (3, 8) and projections.teacher_proj.weight.shape == (3, 16)
    assert projections(torch.randn(5, 8), torch.randn(5, 4, 2, 2)).shape == ()


def test_weighted_sum() -> None:
    assert weighted_sum([torch.tensor(2.0), torch.tensor(3.0)], [0.5, 2.0]).item() == pytest.approx(7.0)
    with pytest.raises(ValueError, match="as many weights as losses"):
        weighted_sum([torch.tensor(1.0)], [1.0, 2.0])


def test_kd_loss_of_bfloat16_logits_is_computed_in_float32() -> None:
    torch.manual_seed(0)
    student, teacher, targets = torch.randn(6, 5).bfloat16(), torch.randn(6, 5).bfloat16(), torch.randint(0, 5, (6,))
    loss = kd_loss(student, teacher, targets, alpha=0.9, temperature=4.0)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(kd_loss(student.float(), teacher.float(), targets, alpha=0.9, temperature=4.0).item(), abs=0)
