"""Every public module imports on its own in a fresh interpreter (no import cycles, no side effects)."""

from __future__ import annotations

import subprocess
import sys


# The packages that import each other (export ↔ quant ↔ models ↔ measure): the first one
# imported decides the order, so each is tried first in its own interpreter.
MODULES = ["spiralkit.measure", "spiralkit.export", "spiralkit.models", "spiralkit.quant", "spiralkit.quant.compact",
           "spiralkit.quant.nonzero", "spiralkit.quant.stage",
           "spiralkit.cli"]


def test_each_module_imports_alone() -> None:
    failures = []
    for module in MODULES:
        result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
        if result.returncode != 0:
            failures.append(f"{module}: {result.stderr.strip().splitlines()[-1]}")
    assert not failures, "\n".join(failures)
