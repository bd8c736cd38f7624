"""The package layers hold: algorithms below, the spiral above, no import cycles between packages.

Every import in every module (also those inside functions) is read from the source with
`ast`, so the test sees what a run might import, not only what one import order loads.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import spiralkit

PACKAGE_ROOT = Path(spiralkit.__file__).parent

# Bottom to top. A package may import packages of its own layer or below, never above.
LAYERS: dict[str, int] = {
    # small shared helpers
    "errors": 0, "configs": 0, "patterns": 0, "modules": 0, "parallel": 0, "cpu": 0,
    # models, data, counting and timing, weights and ONNX I/O
    "models": 1, "data": 1, "measure": 1, "export": 1,
    # the layer-by-layer calibration scheme that prune/ (Wanda, SparseGPT) and quant/ (GPTQ) share
    "layerwise": 1,
    # the algorithms (and the report's types and writers, which the spiral fills)
    "prune": 2, "graph": 2, "distill": 2, "quant": 2, "report": 2, "latency": 2,
    # training loops and what "good" means
    "train": 3, "tasks": 3,
    # what runs a recipe
    "spiral": 4,
    # the command and its benchmarks
    "bench": 5, "cli": 5, "__main__": 5,
}
ALGORITHMS = ("prune", "graph", "distill", "quant", "latency", "models", "data", "measure", "layerwise")
FORBIDDEN_FOR_ALGORITHMS = ("spiral", "train", "tasks", "bench", "cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> set[str]:
    """Every spiralkit module ``path`` imports, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            found.add(base)
    return {name for name in found if name == "spiralkit" or name.startswith("spiralkit.")}


def _package_of(module: str) -> str | None:
    """``spiralkit.quant.qat`` → ``quant``; the top-level public API (``spiralkit``) → None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _package_imports() -> dict[str, dict[str, list[str]]]:
    """package → imported package → the modules that import it."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        source = _package_of(_module_name(path))
        if source is None:
            continue
        for target in map(_package_of, _imported(path)):
            if target is not None and target != source:
                graph[source][target].append(_module_name(path))
    return graph


def test_every_package_has_a_layer() -> None:
    packages = {_package_of(_module_name(p)) for p in PACKAGE_ROOT.rglob("*.py")} - {None}
    assert packages <= set(LAYERS), f"packages without a layer: {sorted(packages - set(LAYERS))}"


def test_algorithm_packages_never_import_the_spiral_train_or_tasks() -> None:
    graph = _package_imports()
    bad = [f"{module} imports spiralkit.{target}"
           for source in ALGORITHMS for target, modules in graph[source].items()
           if target in FORBIDDEN_FOR_ALGORITHMS for module in modules]
    assert not bad, "\n".join(bad)


def test_no_package_imports_a_layer_above_it() -> None:
    graph = _package_imports()
    bad = [f"{module} (layer {LAYERS[source]}) imports spiralkit.{target} (layer {LAYERS[target]})"
           for source, targets in graph.items() for target, modules in targets.items()
           if LAYERS[target] > LAYERS[source] for module in modules]
    assert not bad, "\n".join(bad)


def _cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle of the package graph, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in graph.get(node, {}):
            if state.get(target) == "open":
                return [*stack[stack.index(target):], target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in list(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_packages() -> None:
    graph = _package_imports()
    cycle = _cycle(graph)
    assert cycle is None, " → ".join(cycle or []) + "\n" + "\n".join(
        f"{a} → {b}: {', '.join(sorted(set(graph[a][b])))}" for a, b in zip(cycle or [], (cycle or [])[1:])
    )


def test_the_checks_catch_what_they_are_for() -> None:
    """The cycle finder and the import reader on known inputs, so a silent pass means something."""
    assert _cycle({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b": []}, "b": {}}) is None
    quant = PACKAGE_ROOT / "quant" / "__init__.py"
    assert "spiralkit.quant.affine" in _imported(quant)


# export, quant, models and measure once imported each other, so the first one imported
# decided the order; each is tried first in its own interpreter, so that a cycle between
# modules (which the package graph above does not see) fails here.
ENTRY_MODULES = ["spiralkit.measure", "spiralkit.export", "spiralkit.models", "spiralkit.quant", "spiralkit.quant.compact",
                 "spiralkit.latency", "spiralkit.spiral.recipe", "spiralkit.spiral.quantize", "spiralkit.cli"]


def test_each_entry_module_imports_alone() -> None:
    """A fresh interpreter importing only the module succeeds."""
    failures = []
    for module in ENTRY_MODULES:
        result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
        if result.returncode != 0:
            failures.append(f"{module}: {result.stderr.strip().splitlines()[-1]}")
    assert not failures, "\n".join(failures)
