"""Torch-Pruning stays behind `spiralkit.graph.tp`: a Torch-Pruning upgrade changes one file."""

from __future__ import annotations

import re
from pathlib import Path

import spiralkit

_IMPORT = re.compile(r"^\s*(?:import|from)\s+torch_pruning\b", re.MULTILINE)


def test_only_graph_tp_imports_torch_pruning() -> None:
    root = Path(spiralkit.__file__).parent
    importers = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py") if _IMPORT.search(p.read_text(encoding="utf-8")))
    assert importers == ["graph/tp.py"]
