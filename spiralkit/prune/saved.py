"""A physically pruned model on disk: architecture as data plus safetensors weights.

A pruned model is saved as the `ModelSpec` that builds the original, plus the plans, plus
safetensors weights (`save_pruned`); `load_pruned` rebuilds it with `load_model`, replays the
plans in remove mode and loads the weights. Nothing is pickled.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

from spiralkit.errors import PruneError
from spiralkit.graph.groups import channel_size
from spiralkit.models.loading import ModelSpec, load_model
from spiralkit.models.saved import load_built_weights, read_built, save_built
from spiralkit.prune.apply import replay_plans
from spiralkit.prune.plan import PrunePlan, plans_json, read_plans

__all__ = ["load_pruned", "save_pruned"]

PLAN_FILENAME = "plan.json"


def _check_removed(model: nn.Module, plan: PrunePlan) -> None:
    for group in plan.groups:
        for member in group.members:
            try:
                module = model.get_submodule(member.module)
            except AttributeError:
                continue
            if channel_size(module, member.role) != len(member.keep):
                raise PruneError(
                    f"save_pruned needs the model pruned with mode='remove': {member.module!r} has "
                    f"{channel_size(module, member.role)} channels, the plan keeps {len(member.keep)}"
                )
            return


def save_pruned(
    model: nn.Module, plan: PrunePlan | Sequence[PrunePlan], directory: Path, *, spec: ModelSpec
) -> Path:
    """Save a physically pruned model as architecture-as-data plus safetensors weights.

    Writes ``spec.json`` (how to build the original model), ``plan.json`` (the plans, in
    the order they were applied) and ``weights.safetensors``, each atomically.

    Args:
        model: The pruned model (every plan applied with ``mode="remove"``).
        plan: The plan, or the plans of successive rounds in order.
        directory: Where to write (created if missing).
        spec: The spec that builds the unpruned model; its checkpoint is not needed and
            is not recorded.

    Returns:
        ``directory``.

    Raises:
        PruneError: The model does not look pruned in remove mode by the (last) plan.
    """
    plans = [plan] if isinstance(plan, PrunePlan) else list(plan)
    if plans:
        _check_removed(model, plans[-1])
    return save_built(model, directory, spec=spec, steps={PLAN_FILENAME: plans_json(plans)})


def load_pruned(directory: Path) -> nn.Module:
    """Rebuild a model saved by `save_pruned`: build from the spec, replay the plans, load the weights.

    Returns:
        The pruned model in eval mode.

    Raises:
        PruneError: A file is missing or malformed.
        ModelError: The spec cannot be built or the weights do not match.
    """
    spec = read_built(directory, steps=[PLAN_FILENAME], what="pruned model", error=PruneError)
    model = replay_plans(load_model(spec), read_plans(Path(directory) / PLAN_FILENAME))
    return load_built_weights(model, directory)
