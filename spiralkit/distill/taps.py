"""Feature capture by module name: forward hooks that record what named submodules return.

A *tap* names a submodule (``"layer1.0.conv2"``, as in ``model.named_modules()``) and, for
modules that return a tuple (Hugging Face attention layers return ``(context, probs)``),
which element to keep. `FeatureTaps` registers one forward hook per tap when entered and
removes every hook when left, also when the forward pass raised::

    with FeatureTaps(student, ["fc1", Tap(module="attn", index=1)], role="student") as taps:
        logits = student(x)
    hidden, probs = taps.features["fc1"], taps.features["attn[1]"]
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from spiralkit.errors import SpiralError

__all__ = ["DistillError", "FeatureTaps", "Tap", "TapSpec", "capture", "resolve_module", "tap_key"]


class DistillError(SpiralError, ValueError):
    """A distillation setting does not fit the models: unknown module, shapes a loss cannot bridge."""


class Tap(BaseModel):
    """One captured output: a submodule by name and, for tuple outputs, which element.

    Attributes:
        module: the submodule's name in ``model.named_modules()``.
        index: element of a tuple/list output (an int) or key of a mapping output (a str,
            e.g. a Hugging Face ``ModelOutput`` field). ``None`` keeps a tensor output as it
            is and takes element 0 of a tuple (the hidden state, by Hugging Face convention).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    module: str
    index: int | str | None = None

    def __str__(self) -> str:
        return tap_key(self)


def _tap_from_string(value: Any) -> Any:
    return {"module": value} if isinstance(value, str) else value


TapSpec = Annotated[Tap, BeforeValidator(_tap_from_string)]
"""A `Tap` that a recipe may also write as the bare module name."""


def tap_key(tap: Tap | str) -> str:
    """The key of a tap's feature: ``"fc1"``, or ``"attn[1]"`` when an element is picked."""
    if isinstance(tap, str):
        return tap
    return tap.module if tap.index is None else f"{tap.module}[{tap.index}]"


def _as_tap(tap: Tap | str) -> Tap:
    return Tap(module=tap) if isinstance(tap, str) else tap


def resolve_module(model: nn.Module, name: str, *, role: str = "model") -> nn.Module:
    """The submodule of ``model`` called ``name``.

    Raises:
        DistillError: no such module; the message lists the closest names (difflib).
    """
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"close names: {', '.join(map(repr, close))}" if close else f"its modules: {', '.join(map(repr, names[:12]))}"
    raise DistillError(f"{role} has no module {name!r}; {hint}")


def _select(output: Any, tap: Tap, role: str) -> Tensor:
    """The tensor a tap keeps from a module's output."""
    value = output
    if tap.index is not None:
        try:
            value = output[tap.index]
        except (IndexError, KeyError, TypeError):
            kind = type(output).__name__
            size = f" of {len(output)}" if isinstance(output, Sequence) else ""
            raise DistillError(
                f"{role} module {tap.module!r} returned a {kind}{size}; cannot take element {tap.index!r}"
            ) from None
    elif isinstance(output, (tuple, list)) and output:
        value = output[0]
    if not isinstance(value, Tensor):
        raise DistillError(
            f"{role} module {tap.module!r} gave a {type(value).__name__}, not a tensor; pick an element with 'index'"
        )
    return value


class FeatureTaps:
    """Records the outputs of named submodules while it is entered.

    Names are checked when the object is built, so a typo fails before any forward pass.
    A module run several times in one forward pass (shared weights) keeps its last output.

    Args:
        model: the model whose submodules are tapped.
        taps: module names or `Tap` objects.
        role: how error messages call the model (``"student"``, ``"teacher"``).

    Raises:
        DistillError: a name is not a submodule of ``model``.
    """

    def __init__(self, model: nn.Module, taps: Iterable[Tap | str], *, role: str = "model") -> None:
        self._role = role
        self._taps = [_as_tap(t) for t in taps]
        self._modules = [resolve_module(model, t.module, role=role) for t in self._taps]
        self._handles: list[RemovableHandle] = []
        self.features: dict[str, Tensor] = {}

    def _hook(self, tap: Tap):  # noqa: ANN202 - a torch forward hook
        key = tap_key(tap)

        def record(module: nn.Module, args: Any, output: Any) -> None:
            self.features[key] = _select(output, tap, self._role)

        return record

    def __enter__(self) -> FeatureTaps:
        self.features = {}
        try:
            for tap, module in zip(self._taps, self._modules, strict=True):
                self._handles.append(module.register_forward_hook(self._hook(tap)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this object registered (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def missing(self) -> list[str]:
        """Taps whose module did not run during the forward pass."""
        return [tap_key(t) for t in self._taps if tap_key(t) not in self.features]


def capture(
    model: nn.Module, x: Any, taps: Iterable[Tap | str], *, role: str = "model"
) -> tuple[Any, dict[str, Tensor]]:
    """Run ``model(x)`` once and return its output with the tapped features.

    Raises:
        DistillError: a tap names no submodule, or its module did not run.
    """
    with FeatureTaps(model, taps, role=role) as recorder:
        output = model(x)
    if missing := recorder.missing():
        raise DistillError(f"{role} modules {missing} did not run in the forward pass")
    return output, recorder.features

