"""Recipes: the whole spiral as one typed, validated config, loaded from YAML.

YAML is read with a safe loader; every section is a pydantic model that forbids unknown
keys, so a typo is an error that names the key, its path and its line in the file.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from torch import Tensor, nn
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from spiralkit.configs import KindTable
from spiralkit.data import DataSpec
from spiralkit.errors import ConfigError, RecipeError
from spiralkit.models import ModelSpec
from spiralkit.data.sources import imports_code as data_imports_code
from spiralkit.models.loading import imports_code as model_imports_code
from spiralkit.models.loading import is_pretrained
from spiralkit.spiral.prune import PruneStageConfig
from spiralkit.spiral.quantize import CompactQuant, QuantizeStage
from spiralkit.spiral.recovery import Distill, Recovery
from spiralkit.spiral.student import StudentStage
from spiralkit.tasks import Classification, EmbeddingFidelity, Task
from spiralkit.train import TrainConfig


@dataclass(frozen=True, eq=False)
class _Origin:
    """Where a recipe was read from (file name, YAML nodes), to give later errors their line.

    Not part of what the recipe says: any two origins compare equal, so recipes compare by content.
    """

    source: str
    root: yaml.Node | None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Origin)

    def __hash__(self) -> int:
        return 0


class Targets(BaseModel):
    """When a round is kept and when the spiral stops.

    Attributes:
        max_metric_drop: a round whose validation metric is worse than the baseline's by
            more than this (in the metric's units, e.g. accuracy points) is rolled back
            and the step halved; a drop equal to it (up to float rounding) is kept.
        min_step: stop when the next step of sparsity would be smaller than this.
        max_rounds: stop after this many rounds, kept or rolled back.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_metric_drop: float = Field(default=0.5, ge=0)
    min_step: float = Field(default=0.005, gt=0, lt=1)
    max_rounds: int = Field(default=30, gt=0)


class MeasureConfig(BaseModel):
    """How latency is measured: batch size, threads, warm-up and repeats (median reported), and the clock.

    ``clock: cpu`` times the CPU time of the process instead of the wall clock: on a machine
    whose cores other jobs share it is not inflated by preemption (one thread only; see
    `spiralkit.measure.measure_call`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    batch_size: int = Field(default=1, gt=0)
    threads: int = Field(default=1, gt=0)
    warmup: int = Field(default=10, ge=0)
    repeats: int = Field(default=50, gt=0)
    clock: Literal["wall", "cpu"] = "wall"


class Recipe(BaseModel):
    """Everything a spiral run needs.

    Attributes:
        name: a label for the run and its report.
        seed: seeds baseline training and every round.
        threads: torch's intra-op threads for training (``None``: torch's default).
        model: which model, and its trained weights when it has them.
        data: which data and batch sizes.
        task: what is measured (classification accuracy).
        train: trains the baseline: from scratch, or from the model's checkpoint (or a
            pretrained Hugging Face model's weights) as a fine-tune; without it, the
            checkpoint is the baseline as it is.
        student: distil a smaller student from the baseline first; the pruning rounds and
            the quantization then work on the student.
        prune: the pruning stages, run in order — one mapping or a list (empty: no pruning
            rounds, e.g. quantization only). Structured stages come before unstructured
            ones: a hybrid recipe removes channels first, then prunes weights of what remains.
        recover: distillation from the unpruned model, or fine-tuning.
        quantize: the final quantization stage (none by default).
        targets: tolerance and stopping rules.
        measure: latency measurement settings.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = "run"
    seed: int = 0
    threads: int | None = Field(default=None, gt=0)
    model: ModelSpec
    data: DataSpec
    task: Task = Classification()
    train: TrainConfig | None = None
    student: StudentStage | None = None
    prune: tuple[PruneStageConfig, ...] = ()
    recover: Recovery = Distill()
    quantize: QuantizeStage | None = None
    targets: Targets = Targets()
    measure: MeasureConfig = MeasureConfig()
    _origin: _Origin = PrivateAttr(default_factory=lambda: _Origin("<recipe>", None))

    def code_references(self) -> list[str]:
        """The keys naming code to import and run (``package.module:function``), e.g. ``["model.name"]``."""
        return [key for key, imports in (("model.name", model_imports_code(self.model.name)),
                                         ("data.name", data_imports_code(self.data.name))) if imports]

    def check_code(self, *, allow_code: bool) -> None:
        """Refuse a recipe that names code to import unless ``allow_code``; nothing is imported here.

        Raises:
            RecipeError: the key and line of the first code name.
        """
        if allow_code or not (keys := self.code_references()):
            return
        value = self.model.name if keys[0] == "model.name" else self.data.name
        raise self.error(keys[0], f"{value!r} names Python code that the run would import and call; run a recipe "
                                  "that imports code only if you trust it, with --allow-code (API: allow_code=True)")

    def check_model(self, model: nn.Module, example: Tensor) -> None:
        """The checks that need the model (its layer names), run before any training.

        Raises:
            RecipeError: a pattern or layer name that matches nothing; names the key and line.
        """
        stages: list[tuple[str, Any]] = [(f"prune.{index}", stage) for index, stage in enumerate(self.prune)]
        if self.quantize is not None:
            stages.append(("quantize", self.quantize))
        for key, stage in stages:
            try:
                stage.check(model, example)
            except ConfigError as exc:
                raise self.error(f"{key}.{exc.key}", str(exc)) from None

    def error(self, key: str, message: str) -> RecipeError:
        """A `RecipeError` about ``key`` (dotted, e.g. ``prune.0.exclude``), with its file and line."""
        path: list[str | int] = [int(part) if part.isdigit() else part for part in key.split(".")]
        if path and path[0] == "prune" and (len(path) == 1 or isinstance(path[1], str)):
            path.insert(1, 0)  # `prune:` written as one mapping is stage 0
        _, line = _locate(self._origin.root, path)
        where = f"{self._origin.source}, line {line}" if line else self._origin.source
        return RecipeError(f"{where}: key {key!r}: {message}")

    @field_validator("prune", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return () if value is None else [value] if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _stages_in_order(self) -> Recipe:
        for index, stage in enumerate(self.prune):
            if stage.removes_structure and not all(s.removes_structure for s in self.prune[:index]):
                raise ValueError(
                    f"prune stage {index + 1} is structured but follows an unstructured stage: "
                    "remove channels first, then prune weights"
                )
        if isinstance(self.quantize, CompactQuant) and any(s.removes_structure for s in self.prune):
            raise ValueError("quantize kind 'compact' cannot follow structured pruning yet; use kind 'static-int8'")
        if self.train is not None and self.train.epochs == 0 and self.model.checkpoint is None \
                and not is_pretrained(self.model):
            raise ValueError(
                f"train.epochs is 0 and model {self.model.name!r} has no checkpoint: the run would compress "
                "an untrained model; give 'model.checkpoint' or train for at least one epoch"
            )
        if self.data.name == "sst2" and self.data.kwargs.get("splice") and not isinstance(self.task, EmbeddingFidelity):
            raise ValueError(
                "data.kwargs.splice adds unlabeled sentences, which only task 'fidelity' trains on "
                f"(this recipe's task is {self.task.kind!r}); remove splice"
            )
        return self


def _locate(root: yaml.Node | None, loc: Sequence[str | int]) -> tuple[list[str | int], int | None]:
    """The YAML path of a pydantic error location, and the 1-based line where it is.

    Discriminated unions put their tag (e.g. ``distill``) into the location; such parts
    are not keys of the YAML document and are dropped. The line is that of the deepest
    key that exists in the document.
    """
    path: list[str | int] = []
    node = root
    line = root.start_mark.line + 1 if root is not None else None
    for index, part in enumerate(loc):
        last = index == len(loc) - 1
        child = None
        if isinstance(node, yaml.MappingNode):
            child = next(((k, v) for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = (node.value[part], node.value[part])
        if child is None:
            if last or not isinstance(node, yaml.MappingNode):
                path.append(part)
            continue
        path.append(part)
        line = child[0].start_mark.line + 1
        node = child[1]
    return path, line


def _models_in(annotation: Any) -> list[Any]:
    """The pydantic models an annotation can hold: through unions, ``Annotated``, kind tables, tuples and lists."""
    tables = [meta for meta in getattr(annotation, "__metadata__", ()) if isinstance(meta, KindTable)]
    if tables:
        return [model for table in tables for model in table.models()]
    if hasattr(annotation, "model_fields"):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


def _known_keys(path: Sequence[str | int]) -> list[str]:
    """Field names of the config(s) at ``path``'s parent, for "did you mean" hints."""
    models: list[Any] = [Recipe]
    for part in path[:-1]:
        if isinstance(part, int):
            continue
        fields = [m.model_fields[part] for m in models if part in m.model_fields]
        models = [m for field in fields for m in _models_in(field.rebuild_annotation())]
    return list(dict.fromkeys(name for m in models for name in m.model_fields))


def _describe(error: Any, root: yaml.Node | None, source: str) -> str:
    path, line = _locate(root, error["loc"])
    dotted = ".".join(str(p) for p in path) or "(top level)"
    where = f"{source}, line {line}" if line else source
    if error["type"] == "extra_forbidden":
        hint = difflib.get_close_matches(str(path[-1]), _known_keys(path), n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"{where}: unknown key {dotted!r}{suggestion}"
    if error["type"] == "missing":
        return f"{where}: missing required key {dotted!r}"
    return f"{where}: key {dotted!r}: {error['msg']} (got {error.get('input')!r})"


MAX_RECIPE_BYTES = 1 << 20
"""A recipe file larger than this is refused (recipes are a few kilobytes)."""
MAX_RECIPE_NODES = 100_000
"""A recipe whose YAML nodes, with every alias expanded, number more than this is refused:
a few nested aliases ("billion laughs") would otherwise expand into billions of values."""


def _expanded_nodes(root: yaml.Node | None) -> int:
    """How many nodes the document has with its aliases expanded, counted without expanding them."""
    counts: dict[int, int] = {}

    def count(node: yaml.Node) -> int:
        if id(node) not in counts:
            counts[id(node)] = 0  # a recursive alias counts once, not forever
            children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else \
                node.value if isinstance(node, yaml.SequenceNode) else []
            counts[id(node)] = min(1 + sum(count(child) for child in children), MAX_RECIPE_NODES + 1)
        return counts[id(node)]

    return count(root) if root is not None else 0


def _check_duplicates(node: yaml.Node | None, source: str, seen_nodes: set[int] | None = None) -> None:
    """Refuse a mapping that repeats a key; each node is visited once, however many aliases share it."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if node is None or id(node) in seen_nodes:
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key, value in node.value:
            line = key.start_mark.line + 1
            if key.value in seen:
                raise RecipeError(f"{source}, line {line}: duplicate key {key.value!r} (first on line {seen[key.value]})")
            seen[key.value] = line
            _check_duplicates(value, source, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicates(item, source, seen_nodes)


def _yaml_error(exc: yaml.YAMLError, source: str) -> RecipeError:
    mark = getattr(exc, "problem_mark", None)
    where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else source
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    return RecipeError(f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else ""))


def parse_recipe(text: str, *, source: str = "<recipe>") -> Recipe:
    """Validate a YAML recipe.

    Raises:
        RecipeError: bad YAML, a document too large or with too many expanded aliases, a
            duplicate, unknown or missing key, or a bad value; the message names the key
            and its line in ``source``.
    """
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{source}: {len(text):,} characters; a recipe may have at most {MAX_RECIPE_BYTES:,}")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None
    if _expanded_nodes(root) > MAX_RECIPE_NODES:
        raise RecipeError(f"{source}: more than {MAX_RECIPE_NODES:,} values once its aliases are expanded; "
                          "write the recipe out without nested aliases")
    _check_duplicates(root, source)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping of keys, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        messages = [_describe(error, root, source) for error in exc.errors()]
        raise RecipeError("invalid recipe:\n  " + "\n  ".join(messages)) from None
    recipe._origin = _Origin(source, root)
    return recipe


def load_recipe(path: Path) -> Recipe:
    """Read and validate the recipe file at ``path``.

    Raises:
        RecipeError: the file is missing or the recipe is invalid (see :func:`parse_recipe`).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except IsADirectoryError:
        raise RecipeError(f"recipe {path} is a directory, not a YAML file") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe {path} is not UTF-8 text (byte {exc.start}): is it a YAML file?") from None
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    return parse_recipe(text, source=str(path))


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML (defaults included) — what a run directory keeps to resume from."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
