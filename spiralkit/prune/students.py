"""Students built from their teachers: shallower, narrower, or the teacher itself.

* **Shallow** (`ShallowStudent`): a copy of the teacher keeping some of the layers of each
  layer stack, with their weights — DistilBERT's initialisation (Sanh et al. 2019,
  "DistilBERT, a distilled version of BERT": "taking one layer out of two"). ``every: k``
  keeps layers ``0, k, 2k, …``; ``keep: [...]`` names them. Layer stacks are found in
  Hugging Face encoders (the ``ModuleList`` of ``config.num_hidden_layers`` layers, e.g.
  ``encoder.encoder.layer``; the config is updated), ``nn.TransformerEncoder.layers``
  (``num_layers`` is updated) and ``nn.Sequential`` stacks of same-type blocks such as the
  stages ``layer1..3`` of a CIFAR ResNet; or named explicitly with ``stacks:``. Student
  layer ``j`` of a stack is teacher layer ``keep[j]`` (`StudentLayout.layer_pairs` lists the
  pairs, for hint or attention distillation between them).
* **Narrow** (`NarrowStudent`): the teacher with a share of its channels, attention heads
  and MLP neurons physically removed by structured pruning (`spiralkit.prune.structured`).
* **Pruned** (`PrunedStudent`, the spiral's default): the teacher itself, compressed in
  place by the spiral's own pruning rounds.

Like pruning, making a student is two plain calls — `plan_student` decides (the result, a
`StudentLayout`, is plain data: the spec, the kept layer indices, the prune plan) and
`apply_student` acts — and `build_student` does both on a copy of the teacher. A student is
saved as data (`save_student`: the teacher's `ModelSpec`, the layout as JSON and safetensors
weights) and rebuilt without pickling (`student_architecture`, `load_student`).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor, nn

from spiralkit.configs import kind_from_string
from spiralkit.errors import ModelError
from spiralkit.graph.groups import Example, call_model
from spiralkit.models.loading import ModelSpec, load_model
from spiralkit.models.saved import load_built_weights, read_built, save_built
from spiralkit.modules import eval_mode
from spiralkit.prune.apply import apply_plan
from spiralkit.prune.importance import LossFn, Magnitude
from spiralkit.prune.plan import PrunePlan
from spiralkit.prune.structured import StructuredPrune, plan_pruning
from spiralkit.prune.structured_importance import ChannelCriterion

__all__ = [
    "LayerStack",
    "NarrowStudent",
    "PrunedStudent",
    "ShallowStudent",
    "StudentLayout",
    "StudentSpec",
    "apply_student",
    "build_student",
    "find_layer_stacks",
    "load_student",
    "plan_student",
    "save_student",
    "student_architecture",
]

STUDENT_FILENAME = "student.json"


# --------------------------------------------------------------------------- specs


class ShallowStudent(BaseModel):
    """Keep some layers of every layer stack, with the teacher's weights (DistilBERT-style).

    Attributes:
        every: Keep layers ``0, every, 2·every, …`` of each stack.
        keep: Or: the layer indices to keep in each stack, increasing.
        stacks: Dotted names of the stacks (``nn.Sequential`` or ``nn.ModuleList``); empty
            finds them (see `find_layer_stacks`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["shallow"] = "shallow"
    every: int | None = Field(default=None, ge=1)
    keep: tuple[Annotated[int, Field(ge=0)], ...] | None = Field(default=None, min_length=1)
    stacks: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _one_rule(self) -> ShallowStudent:
        if (self.every is None) == (self.keep is None):
            raise ValueError("a shallow student needs exactly one of `every` (keep every k-th layer) or `keep` (indices)")
        if self.keep is not None and list(self.keep) != sorted(set(self.keep)):
            raise ValueError(f"`keep` must list distinct layer indices in increasing order, got {list(self.keep)}")
        return self

    def kept(self, size: int) -> tuple[int, ...]:
        """The indices kept out of a stack of ``size`` layers (not range-checked)."""
        return tuple(range(0, size, self.every)) if self.every is not None else tuple(self.keep or ())


class NarrowStudent(BaseModel):
    """The teacher made narrower by structured pruning (channels, heads, MLP neurons removed).

    Attributes:
        ratio: Share of each channel group (and of each attention layer's heads) removed.
        criterion: Channel/head importance (see `spiralkit.prune.structured.StructuredPrune`).
        heads: Remove whole attention heads too.
        round_to: Kept widths are multiples of this.
        include: Name patterns of the layers whose outputs may be removed.
        exclude: Name patterns of layers to keep whole.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["narrow"] = "narrow"
    ratio: float = Field(gt=0, lt=1)
    criterion: ChannelCriterion = Magnitude(norm=2)
    heads: bool = True
    round_to: int = Field(default=1, ge=1)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()

    def prune_config(self) -> StructuredPrune:
        """The structured-pruning step this student is."""
        return StructuredPrune(ratio=self.ratio, criterion=self.criterion, heads=self.heads,
                               round_to=self.round_to, include=self.include, exclude=self.exclude)


class PrunedStudent(BaseModel):
    """The teacher itself; the spiral's pruning rounds compress it (the default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["pruned"] = "pruned"


StudentSpec = Annotated[
    ShallowStudent | NarrowStudent | PrunedStudent, Field(discriminator="kind"), BeforeValidator(kind_from_string)
]


class LayerStack(BaseModel):
    """One layer stack of a shallow student: its name, the teacher's size and the kept layers."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    module: str
    size: int = Field(ge=1)
    keep: tuple[int, ...]


class StudentLayout(BaseModel):
    """What a student keeps of its teacher: plain data, saved as JSON, replayable on a fresh teacher.

    Attributes:
        version: Format version.
        spec: The student spec it was planned from.
        stacks: Shallow students: the kept layers of every stack.
        plan: Narrow students: the structured-pruning plan.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    version: Literal[1] = 1
    spec: StudentSpec
    stacks: tuple[LayerStack, ...] = ()
    plan: PrunePlan | None = None

    def layer_pairs(self) -> tuple[tuple[str, str], ...]:
        """``(student layer, teacher layer)`` module names: student ``stack.j`` is teacher ``stack.keep[j]``."""
        return tuple(
            (f"{stack.module}.{j}", f"{stack.module}.{index}") for stack in self.stacks for j, index in enumerate(stack.keep)
        )


# --------------------------------------------------------------------------- finding layer stacks


def _config_layers(module: nn.Module) -> int | None:
    value = getattr(getattr(module, "config", None), "num_hidden_layers", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _is_block_stack(module: nn.Module) -> bool:
    """An ``nn.Sequential`` of two or more composite blocks of one type (residual stages)."""
    children = list(module.children())
    return (
        type(module) is nn.Sequential
        and len(children) > 1
        and len({type(child) for child in children}) == 1
        and all(any(True for _ in child.children()) and any(True for _ in child.parameters()) for child in children)
    )


def find_layer_stacks(model: nn.Module) -> tuple[str, ...]:
    """Dotted names of ``model``'s layer stacks, in model order.

    A stack is (1) the ``ModuleList`` of a Hugging Face model that holds
    ``config.num_hidden_layers`` layers, (2) the ``layers`` of an ``nn.TransformerEncoder``,
    or (3) an ``nn.Sequential`` of two or more blocks of one type that have submodules (e.g.
    ResNet stages). Stacks inside another stack's layers are not listed.

    Raises:
        ModelError: No stack is found; the message names the model class.
    """
    found: list[str] = []
    hf_owners = {name: count for name, module in model.named_modules() if (count := _config_layers(module)) is not None}
    for name, module in model.named_modules():
        if any(name.startswith(f"{stack}.") for stack in found):
            continue
        owner, _, attribute = name.rpartition(".")
        parent = model.get_submodule(owner) if name else None
        hf_stack = isinstance(module, nn.ModuleList) and any(
            (name.startswith(f"{o}.") or not o) and len(module) == count for o, count in hf_owners.items()
        )
        torch_stack = isinstance(parent, nn.TransformerEncoder) and attribute == "layers"
        if hf_stack or torch_stack or _is_block_stack(module):
            found.append(name)
    if not found:
        raise ModelError(
            f"no layer stack found in {type(model).__name__}: a shallow student needs a Hugging Face encoder "
            "(e.g. encoder.layer), an nn.TransformerEncoder or an nn.Sequential of residual blocks; name the "
            "stack (an nn.Sequential or nn.ModuleList) with `stacks:`"
        )
    return tuple(found)


def _stack(model: nn.Module, name: str) -> nn.Sequential | nn.ModuleList:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        containers = [n for n, m in model.named_modules() if isinstance(m, nn.Sequential | nn.ModuleList) and n]
        listed = ", ".join(containers[:10]) + (", ..." if len(containers) > 10 else "") or "none"
        raise ModelError(
            f"{type(model).__name__} has no module {name!r} to take layers from; its Sequential/ModuleList "
            f"modules are: {listed}"
        ) from None
    if not isinstance(module, nn.Sequential | nn.ModuleList):
        raise ModelError(f"stack {name!r} is a {type(module).__name__}, not an nn.Sequential or nn.ModuleList")
    return module


# --------------------------------------------------------------------------- planning


def plan_student(
    spec: ShallowStudent | NarrowStudent | PrunedStudent,
    teacher: nn.Module,
    *,
    example: Example | None = None,
    batches: Iterable[tuple[Any, Tensor]] = (),
    loss_fn: LossFn | None = None,
) -> StudentLayout:
    """Decide what a student keeps of ``teacher`` (the teacher is not changed).

    Args:
        spec: The student.
        teacher: The teacher model.
        example: An input batch. Narrow students need it (tracing); shallow students use it,
            when given, to check that every dropped layer maps its input to an output of the
            same shape.
        batches: Data for data-driven pruning criteria (narrow students).
        loss_fn: Loss for the taylor criterion (narrow students).

    Returns:
        The layout.

    Raises:
        ModelError: No layer stack, an unknown stack name, a kept index out of range, a
            dropped layer that changes the shape, or a narrow student without an example.
        PruneError: The structured-pruning step cannot be planned.
    """
    if isinstance(spec, ShallowStudent):
        stacks = tuple(_plan_stack(teacher, name, spec) for name in spec.stacks or find_layer_stacks(teacher))
        if example is not None:
            _check_droppable(teacher, stacks, example)
        return StudentLayout(spec=spec, stacks=stacks)
    if isinstance(spec, NarrowStudent):
        if example is None:
            raise ModelError("a narrow student is made by structured pruning, which needs an example input batch")
        plan = plan_pruning(teacher, spec.prune_config(), example=example, batches=batches, loss_fn=loss_fn)
        return StudentLayout(spec=spec, plan=plan)
    if isinstance(spec, PrunedStudent):
        return StudentLayout(spec=spec)
    raise ModelError(f"unknown student spec {type(spec).__name__}")


def _plan_stack(model: nn.Module, name: str, spec: ShallowStudent) -> LayerStack:
    size = len(_stack(model, name))
    keep = spec.kept(size)
    outside = [index for index in keep if index >= size]
    if outside:
        raise ModelError(
            f"a shallow student keeps layer {outside[0]} of {name!r}, which has {size} layers (0..{size - 1})"
        )
    return LayerStack(module=name, size=size, keep=keep)


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], Tensor):
        return value[0]
    return None


def _check_droppable(teacher: nn.Module, stacks: Sequence[LayerStack], example: Example) -> None:
    """Raise when a dropped layer's output shape differs from its input's (e.g. a downsampling block)."""
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    handles = []
    for stack in stacks:
        layers = _stack(teacher, stack.module)
        for index, layer in enumerate(layers):
            if index in stack.keep:
                continue
            name = f"{stack.module}.{index}"

            def hook(module: nn.Module, args: Any, kwargs: Any, output: Any, name: str = name) -> None:
                source = _first_tensor(args) if args else _first_tensor(list(kwargs.values()))
                result = _first_tensor(output)
                if source is not None and result is not None:
                    shapes.setdefault(name, (tuple(source.shape), tuple(result.shape)))

            handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        with eval_mode(teacher), torch.no_grad():
            call_model(teacher, example)
    finally:
        for handle in handles:
            handle.remove()
    for name, (source, result) in shapes.items():
        if source != result:
            raise ModelError(
                f"a shallow student cannot drop {name!r}: it maps shape {source} to {result} (keep the layers "
                "that change the width or resolution, e.g. the first block of a ResNet stage)"
            )


# --------------------------------------------------------------------------- applying


def apply_student(model: nn.Module, layout: StudentLayout) -> nn.Module:
    """Turn ``model`` (the teacher's architecture, e.g. a copy) into the student, in place.

    Returns:
        ``model``. Parameters may be new tensors: build optimizers afterwards.

    Raises:
        ModelError: The layout does not fit the model (a stack is missing or has another size,
            e.g. the layout was already applied).
        PruneError: The prune plan does not fit the model.
    """
    for stack in layout.stacks:
        _shrink(model, stack)
    if layout.plan is not None:
        apply_plan(model, layout.plan, mode="remove")
    return model


def _shrink(model: nn.Module, stack: LayerStack) -> None:
    container = _stack(model, stack.module)
    if len(container) != stack.size:
        raise ModelError(
            f"student layout does not fit {type(model).__name__}: {stack.module!r} has {len(container)} layers, "
            f"the layout expects {stack.size} (was it already applied?)"
        )
    layers = list(container)
    for position, index in enumerate(stack.keep):
        _renumber(layers[index], old=index, new=position)
    # Rebuilt in place (same container object, renumbered keys), so that references to the
    # container and subclasses of Sequential/ModuleList survive.
    container._modules = OrderedDict((str(position), layers[index]) for position, index in enumerate(stack.keep))
    _update_counts(model, stack)


def _renumber(layer: nn.Module, *, old: int, new: int) -> None:
    """Hugging Face layers know their position (``layer_idx``, for caches); keep it true."""
    for module in layer.modules():
        if getattr(module, "layer_idx", None) == old:
            module.layer_idx = new


def _update_counts(model: nn.Module, stack: LayerStack) -> None:
    """Update ``num_layers`` (torch) and ``config.num_hidden_layers`` (Hugging Face) of the stack's owners."""
    parts = stack.module.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        owner = model.get_submodule(".".join(parts[:depth]))
        if isinstance(owner, nn.TransformerEncoder) and owner.num_layers == stack.size:
            owner.num_layers = len(stack.keep)
        if _config_layers(owner) == stack.size:
            config = owner.config
            config.num_hidden_layers = len(stack.keep)
            # Some configs carry one entry per layer (e.g. attention types); keep those in step.
            kinds = getattr(config, "layer_types", None)
            if isinstance(kinds, list) and len(kinds) == stack.size:
                config.layer_types = [kinds[i] for i in stack.keep]


def build_student(
    spec: ShallowStudent | NarrowStudent | PrunedStudent,
    teacher: nn.Module,
    *,
    example: Example | None = None,
    batches: Iterable[tuple[Any, Tensor]] = (),
    loss_fn: LossFn | None = None,
) -> nn.Module:
    """A student initialised from ``teacher``'s weights; the teacher is not changed.

    `plan_student` on the teacher, then `apply_student` on a deep copy. To save a narrow
    student, keep the layout: call those two yourself and pass it to `save_student`.

    Arguments and errors are those of `plan_student`.

    Returns:
        The student, in the teacher's train/eval mode.
    """
    layout = plan_student(spec, teacher, example=example, batches=batches, loss_fn=loss_fn)
    return apply_student(copy.deepcopy(teacher), layout)


# --------------------------------------------------------------------------- saving


def student_architecture(
    model_spec: ModelSpec, student: ShallowStudent | NarrowStudent | PrunedStudent | StudentLayout
) -> nn.Module:
    """The student's architecture, rebuilt from the teacher's spec (its checkpoint is not loaded).

    Args:
        model_spec: The spec that builds the teacher.
        student: A layout, or a shallow/pruned student spec (their layout follows from the
            architecture; a narrow student's depends on the teacher's weights, so it needs
            the layout from `plan_student`).

    Returns:
        The model in eval mode, with whatever weights the spec's builder gives.

    Raises:
        ModelError: The spec cannot be built, the layout does not fit, or a narrow student
            is given without its layout.
    """
    model = load_model(model_spec.model_copy(update={"checkpoint": None}))
    if isinstance(student, NarrowStudent):
        raise ModelError(
            "a narrow student's architecture depends on the prune plan made from the teacher's weights: "
            "pass the StudentLayout from plan_student (save_student stores it)"
        )
    layout = student if isinstance(student, StudentLayout) else plan_student(student, model)
    return apply_student(model, layout).eval()


def save_student(model: nn.Module, directory: Path, *, model_spec: ModelSpec, layout: StudentLayout) -> Path:
    """Save a student as data: the teacher's spec, the layout and safetensors weights.

    Writes ``spec.json``, ``student.json`` and ``weights.safetensors`` (each atomically).

    Args:
        model: The student (made with ``layout``).
        directory: Where to write (created if missing).
        model_spec: The spec that builds the teacher; its checkpoint is not recorded.
        layout: From `plan_student`.

    Returns:
        ``directory``.
    """
    return save_built(model, directory, spec=model_spec, steps={STUDENT_FILENAME: layout.model_dump_json(indent=2)})


def read_layout(path: Path) -> StudentLayout:
    """Read a `StudentLayout` written as JSON (``student.json``).

    Raises:
        ModelError: The file is missing or is not a student layout; the message names it.
    """
    path = Path(path)
    try:
        return StudentLayout.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"student layout not found: {path}") from None
    except ValidationError as exc:
        raise ModelError(f"{path}: not a student layout: {exc}") from None


def load_student(directory: Path) -> nn.Module:
    """Rebuild a student saved by `save_student` (architecture from data, then its weights).

    Returns:
        The student in eval mode.

    Raises:
        ModelError: A file is missing or malformed, or the weights do not fit.
    """
    spec = read_built(directory, steps=[STUDENT_FILENAME], what="student", error=ModelError)
    model = student_architecture(spec, read_layout(Path(directory) / STUDENT_FILENAME))
    return load_built_weights(model, directory)
