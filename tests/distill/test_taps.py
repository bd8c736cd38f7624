"""Feature taps: what they record, that they always remove their hooks, and their error messages."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from spiralkit.distill import DistillError, FeatureTaps, Tap, capture
from spiralkit.distill.terms import HintTerm
from spiralkit.errors import SpiralError
from spiralkit.models import mlp


class Pair(nn.Module):
    """Returns a tuple, like a Hugging Face attention layer: (output, probabilities)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x + 1, x.softmax(dim=-1)


class Boom(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("boom")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return mlp(in_features=4, widths=(3,), num_classes=2)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_taps_record_named_outputs_and_remove_hooks() -> None:
    model = _net()
    x = torch.randn(5, 4)
    with FeatureTaps(model, ["fc1", "relu1"], role="student") as taps:
        assert _hooks(model) == 2
        out = model(x)
    assert _hooks(model) == 0
    expected = model.fc1(x)
    assert torch.equal(taps.features["fc1"], expected)
    assert torch.equal(taps.features["relu1"], expected.relu())
    assert torch.equal(out, model(x))


def test_hooks_removed_when_the_forward_pass_raises() -> None:
    model = nn.Sequential(nn.Linear(2, 2), Boom())
    with pytest.raises(RuntimeError, match="boom"), FeatureTaps(model, ["0", "1"]):
        model(torch.zeros(1, 2))
    assert _hooks(model) == 0


def test_unknown_module_lists_close_names() -> None:
    with pytest.raises(DistillError, match=r"student has no module 'fc9'; close names: 'fc2', 'fc1'"):
        FeatureTaps(_net(), ["fc9"], role="student")
    with pytest.raises(ValueError, match=r"teacher has no module 'zzz'; its modules: 'flatten', 'fc1'"):
        FeatureTaps(_net(), ["zzz"], role="teacher")
    assert issubclass(DistillError, SpiralError)


def test_tuple_outputs_pick_an_element() -> None:
    model = nn.Sequential(Pair())
    x = torch.tensor([[0.0, 1.0]])
    _, features = capture(model, x, ["0", Tap(module="0", index=1)])
    assert torch.equal(features["0"], x + 1), "element 0 by default (the hidden state)"
    assert torch.equal(features["0[1]"], x.softmax(dim=-1))
    with pytest.raises(DistillError, match=r"module '0' returned a tuple of 2; cannot take element 2"):
        capture(model, x, [Tap(module="0", index=2)])


def test_non_tensor_output_and_modules_that_do_not_run() -> None:
    class Dict(nn.Module):
        def forward(self, x: Tensor) -> dict[str, object]:
            return {"a": x, "b": "text"}

    model = nn.Sequential(Dict())
    _, features = capture(model, torch.ones(1), [Tap(module="0", index="a")])
    assert torch.equal(features["0[a]"], torch.ones(1))
    with pytest.raises(DistillError, match=r"module '0' gave a str, not a tensor"):
        capture(model, torch.ones(1), [Tap(module="0", index="b")])

    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.idle = nn.Identity(), nn.Identity()

        def forward(self, x: Tensor) -> Tensor:
            return self.used(x)

    branch = Branch()
    with pytest.raises(DistillError, match=r"student modules \['idle'\] did not run"):
        capture(branch, torch.ones(1), ["used", "idle"], role="student")
    assert _hooks(branch) == 0


def test_recipes_write_a_tap_as_its_module_name() -> None:
    term = HintTerm.model_validate({"student": "fc1", "teacher": {"module": "attn", "index": 1}})
    assert term.student == Tap(module="fc1") and str(term.teacher) == "attn[1]"
