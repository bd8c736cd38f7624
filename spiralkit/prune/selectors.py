"""Which modules a pruning step touches.

A :class:`Selector` picks modules by type and by name pattern (``fnmatch`` style,
matched against the dotted module name, e.g. ``"layer1.*.conv2"``). A pattern that
matches no module is an error: it is almost always a typo, and silently pruning
everything would lose the user's intent.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from spiralkit.errors import PruneError
from spiralkit.patterns import first_unmatched, matches_any

DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Selector:
    """Modules to prune: of ``types``, matching any ``include`` and no ``exclude`` pattern.

    Attributes:
        include: name patterns to keep; ``("*",)`` is every module.
        exclude: name patterns to leave alone (e.g. the classifier ``"fc3"``).
        types: module types whose ``weight`` is pruned.
    """

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    types: tuple[type[nn.Module], ...] = DEFAULT_TYPES

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        """Return ``{name: module}`` of the selected modules, in model order.

        Raises:
            PruneError: a pattern matches no module of the selected types, or
                nothing is selected at all.
        """
        candidates = {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, self.types) and getattr(module, "weight", None) is not None
        }
        if (pattern := first_unmatched((*self.include, *self.exclude), candidates)) is not None:
            known = ", ".join(candidates) or "none"
            raise PruneError(f"selector pattern {pattern!r} matches no prunable layer; prunable layers are: {known}")
        chosen = {
            name: module
            for name, module in candidates.items()
            if matches_any(name, self.include) and not matches_any(name, self.exclude)
        }
        if not chosen:
            raise PruneError("the selector excludes every prunable layer: nothing left to prune")
        return chosen


def selected_weights(model: nn.Module, selector: Selector) -> dict[str, nn.Parameter]:
    """Return ``{"<module>.weight": parameter}`` for the selected modules."""
    return {f"{name}.weight": module.weight for name, module in selector.select(model).items()}
