"""Every public module imports on its own in a fresh interpreter (no import cycles, no side effects)."""

from __future__ import annotations

import subprocess
import sys

import pytest

MODULES = [
    "spiralkit", "spiralkit.cli", "spiralkit.runner", "spiralkit.recipe", "spiralkit.data", "spiralkit.models",
    "spiralkit.measure", "spiralkit.export", "spiralkit.export.compact", "spiralkit.export.onnx", "spiralkit.prune",
    "spiralkit.distill", "spiralkit.quant", "spiralkit.quant.ptq", "spiralkit.quant.qat", "spiralkit.quant.mixed",
    "spiralkit.quant.stage", "spiralkit.report", "spiralkit.tasks", "spiralkit.train",
]


def test_each_module_imports_alone() -> None:
    failures = []
    for module in MODULES:
        result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
        if result.returncode != 0:
            failures.append(f"{module}: {result.stderr.strip().splitlines()[-1]}")
    assert not failures, "\n".join(failures)
