"""Every public module imports on its own in a fresh interpreter, and the low layers never import upwards."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import spiralkit

PACKAGE = Path(spiralkit.__file__).parent

# export, quant, models and measure used to import each other, so the first one imported
# decided the order; each is still tried first in its own interpreter, so that a cycle
# reintroduced between them fails here.
MODULES = ["spiralkit.measure", "spiralkit.export", "spiralkit.models", "spiralkit.quant", "spiralkit.quant.compact",
           "spiralkit.quant.nonzero", "spiralkit.quant.qat", "spiralkit.quant.stage", "spiralkit.qat_training",
           "spiralkit.cli"]

# What each low layer must not import (module prefixes), by the layer's directory.
ABOVE_EXPORT = ("models", "quant", "prune", "graph", "distill", "train", "tasks", "data", "runner", "recipe",
                "qat_training", "report", "cli")
ABOVE_ALGORITHMS = ("train", "tasks", "data", "runner", "recipe", "qat_training", "report", "cli")
FORBIDDEN = {"export": ABOVE_EXPORT, "quant": ABOVE_ALGORITHMS}
# The spiral's quantize stage still lives in quant/ until it moves to the spiral layer.
SPIRAL_LAYER_FILES = {"quant/stage.py"}


def test_each_module_imports_alone() -> None:
    failures = []
    for module in MODULES:
        result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
        if result.returncode != 0:
            failures.append(f"{module}: {result.stderr.strip().splitlines()[-1]}")
    assert not failures, "\n".join(failures)


def _imported(path: Path) -> set[str]:
    """The spiralkit modules a file imports (absolute names, ``spiralkit.`` removed)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return {name.removeprefix("spiralkit.") for name in names if name.startswith("spiralkit.")}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_does_not_import_upwards(layer: str) -> None:
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files
    upward = [
        f"{path.relative_to(PACKAGE)} imports spiralkit.{name}"
        for path in files
        if str(path.relative_to(PACKAGE)) not in SPIRAL_LAYER_FILES
        for name in sorted(_imported(path))
        if name.split(".")[0] in FORBIDDEN[layer]
    ]
    assert not upward, "\n".join(upward)
