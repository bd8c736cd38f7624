"""Whole residual blocks and transformer layers as prunable units (depth pruning).

A block can be dropped when the network stays well-formed without it: it is an element of an
``nn.Sequential`` or ``nn.ModuleList``, its output has its input's shape, and the output
reaches the input through a skip connection (an addition, possibly behind a ReLU or a
LayerNorm), so the identity is a meaningful stand-in. Which blocks matter least is measured by
their *block influence* ``BI = 1 − cos(x_in, x_out)`` (Men et al. 2024, "ShortGPT: Layers in
Large Language Models are More Redundant Than You Expect"; here over each sample's whole
flattened activation): a block that barely changes its input is removed first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from spiralkit.modules import eval_mode

__all__ = ["Block", "block_influence", "find_blocks", "remove_blocks"]

# Operations a skip connection may pass through between a block's input and its output.
_SKIP_OPS = frozenset({"Add", "Relu", "NativeLayerNorm", "Clone", "NativeDropout", "ToCopy", "Alias"})
_MAX_SKIP_DEPTH = 12


@dataclass(frozen=True)
class Block:
    """A removable block.

    Attributes:
        module: Dotted name of the block.
        influence: Its block influence on the data it was measured on (low = removable).
    """

    module: str
    influence: float


def _first_tensor(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], Tensor):
        return obj[0]
    return None


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Children of Sequential/ModuleList containers that have at least one sibling."""
    found: dict[str, nn.Module] = {}
    for name, container in model.named_modules():
        if isinstance(container, (nn.Sequential, nn.ModuleList)) and len(container) > 1:
            for key, child in container.named_children():
                if any(True for _ in child.parameters()):
                    found[f"{name}.{key}" if name else key] = child
    return found


def _skips(output: Tensor, source: Tensor) -> bool:
    """Whether ``output`` reaches ``source`` through skip-connection operations, one an addition."""
    target = source.grad_fn
    if target is None or output.grad_fn is None:
        return False
    stack = [(output.grad_fn, 0, False)]
    while stack:
        node, depth, added = stack.pop()
        if node is target:
            if added:
                return True
            continue
        op = node.name().split("Backward")[0]
        if depth >= _MAX_SKIP_DEPTH or op not in _SKIP_OPS:
            continue
        stack.extend((nxt, depth + 1, added or op == "Add") for nxt, _ in node.next_functions if nxt is not None)
    return False


def _influence(source: Tensor, output: Tensor) -> Tensor:
    """``1 − cos`` between each sample's input and output, flattened; shape ``(batch,)``."""
    a = source.detach().reshape(source.shape[0], -1).double()
    b = output.detach().reshape(output.shape[0], -1).double()
    return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)


def find_blocks(model: nn.Module, inputs: Iterable[Any], *, call: Any) -> tuple[Block, ...]:
    """Removable residual blocks of ``model`` with their block influence, in model order.

    Args:
        model: The model; run with gradients enabled (to see the skip connections), its
            train/eval modes restored afterwards.
        inputs: Input batches; the first decides which blocks qualify, all are averaged
            for the influence.
        call: ``call(model, batch)`` runs the model on one batch.

    Returns:
        The blocks whose input and output shapes match and which have a skip connection.
    """
    candidates = _candidates(model)
    seen: dict[str, list[Tensor]] = {name: [] for name in candidates}
    qualified: dict[str, bool] = {}
    handles = []
    for name, module in candidates.items():

        def hook(module: nn.Module, args: Any, kwargs: Any, out: Any, name: str = name) -> None:
            source, result = _first_tensor(args) if args else _first_tensor(list(kwargs.values())), _first_tensor(out)
            if source is None or result is None or source.shape != result.shape or not source.is_floating_point():
                qualified[name] = False
                return
            if name not in qualified:
                qualified[name] = _skips(result, source)
            seen[name].append(_influence(source, result))

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with eval_mode(model), torch.enable_grad():
            for batch in inputs:
                call(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return tuple(
        Block(module=name, influence=float(torch.cat(seen[name]).mean()))
        for name in candidates
        if qualified.get(name) and seen[name]
    )


def block_influence(blocks: Sequence[Block]) -> dict[str, float]:
    """``{block name: influence}``."""
    return {block.module: block.influence for block in blocks}


def remove_blocks(model: nn.Module, names: Iterable[str]) -> None:
    """Delete the named blocks from their containers.

    ``nn.ModuleList`` entries are deleted by position (later entries are renumbered, as
    ``del layers[i]`` does); ``nn.Sequential`` entries by name (the others keep theirs).
    A container's owner that counts its layers in ``num_layers`` is updated.

    Raises:
        KeyError: A name is not a block of the model.
    """
    by_container: dict[str, list[str]] = {}
    for name in names:
        container, _, key = name.rpartition(".")
        by_container.setdefault(container, []).append(key)
    for container_name, keys in by_container.items():
        container = model.get_submodule(container_name)
        if isinstance(container, nn.ModuleList):
            for index in sorted((int(k) for k in keys), reverse=True):
                del container[index]
        else:
            for key in keys:
                delattr(container, key)
        owner_name = container_name.rpartition(".")[0]
        owner = model.get_submodule(owner_name) if container_name else model
        if isinstance(getattr(owner, "num_layers", None), int) and owner is not container:
            owner.num_layers = len(container)
