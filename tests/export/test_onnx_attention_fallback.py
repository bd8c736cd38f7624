"""`export_onnx` retries a failed export with eager attention for Hugging Face-style models."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from spiralkit.export.onnx import ExportError, export_onnx, verify_onnx


class _SwitchableAttention(nn.Module):
    """Stands in for a Hugging Face model: exports only with eager attention (or never, ``broken``)."""

    def __init__(self, *, broken: bool = False) -> None:
        super().__init__()
        self.config = SimpleNamespace(_attn_implementation="sdpa")
        self.linear = nn.Linear(4, 3)
        self.broken = broken
        self.switches: list[str] = []

    def set_attn_implementation(self, implementation: str) -> None:
        self.switches.append(implementation)
        self.config._attn_implementation = implementation

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_exporting() and (self.broken or self.config._attn_implementation != "eager"):
            raise RuntimeError(f"cannot export {self.config._attn_implementation} attention")
        return self.linear(x)


def test_a_failed_export_is_retried_with_eager_attention_and_the_implementation_restored(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model = nn.Sequential(_SwitchableAttention()).eval()
    x = torch.randn(2, 4)
    path = export_onnx(model, x, tmp_path / "m.onnx")
    verify_onnx(model, path, x)
    assert model[0].switches == ["eager", "sdpa"] and model[0].config._attn_implementation == "sdpa"


def test_when_eager_fails_too_both_errors_are_reported(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model = nn.Sequential(_SwitchableAttention(broken=True)).eval()
    with pytest.raises(ExportError, match=r"(?s)cannot export sdpa attention.*retried with eager attention: .*"
                                          r"cannot export eager attention"):
        export_onnx(model, torch.randn(2, 4), tmp_path / "m.onnx")
    assert model[0].config._attn_implementation == "sdpa" and not (tmp_path / "m.onnx").exists()
