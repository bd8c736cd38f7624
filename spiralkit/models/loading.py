"""Turning a `ModelSpec` into a module: zoo names, ``torchvision:NAME``, ``timm:NAME``, ``hf:ALIAS``, ``module:function``.

Checkpoints are weights only: ``.safetensors`` files (dense or spiralkit-sparse) or torch
files that ``torch.load(weights_only=True)`` accepts. Nothing is ever downloaded.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import pickle
import re
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from spiralkit.errors import ModelError
from spiralkit.export.weights import load_state
from spiralkit.models.causal_lm import tiny_llama
from spiralkit.models.hf import hf_model, packaged_builder
from spiralkit.models.lenet import lenet5, lenet300
from spiralkit.models.mlp import mlp
from spiralkit.models.resnet_cifar import (
    cifar_resnet20,
    cifar_resnet32,
    cifar_resnet44,
    cifar_resnet56,
    resnet20,
    resnet56,
)

__all__ = ["MODEL_SOURCES", "ZOO", "ModelSpec", "imports_code", "is_pretrained", "load_model", "load_weights"]

ZOO: Mapping[str, Callable[..., nn.Module]] = types.MappingProxyType(
    {
        "cifar_resnet20": cifar_resnet20,
        "cifar_resnet32": cifar_resnet32,
        "cifar_resnet44": cifar_resnet44,
        "cifar_resnet56": cifar_resnet56,
        "lenet300": lenet300,
        "lenet5": lenet5,
        "mlp": mlp,
        "resnet20": resnet20,
        "resnet56": resnet56,
        "tiny_llama": tiny_llama,
    }
)
"""Built-in models by name (read-only)."""

_HF_NAME = "hf"
_HF_PREFIX = "hf:"
_MAX_LISTED = 5


class ModelSpec(BaseModel):
    """Which model to build and which weights to load into it.

    Attributes:
        name: A `ZOO` name, ``"torchvision:NAME"`` (built with ``weights=None``),
            ``"timm:NAME"`` (built with ``pretrained=False``; ``kwargs`` go to
            ``timm.create_model``, e.g. ``{"num_classes": 10, "img_size": 32}``),
            ``"hf:ALIAS"`` (a packaged Hugging Face model such as ``hf:minilm-l6``, see
            `spiralkit.models.hf`), ``"hf"`` (a local Hugging Face directory given as
            ``kwargs.path``) or ``"package.module:function"`` (imported and called; must
            return an ``nn.Module``).
        kwargs: Keyword arguments for the builder.
        checkpoint: Optional weights file: ``.safetensors`` or a weights-only torch file.
            Environment variables in it are expanded when it is read
            (``$SPIRALKIT_DATA_DIR/pretrained/cifar10_resnet20_akamaster.safetensors``), so a
            recipe names files under the data root without knowing where it is.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: Path | None = None

    def checkpoint_path(self) -> Path | None:
        """The checkpoint file, its environment variables expanded.

        Raises:
            ModelError: a variable it names is not set.
        """
        if self.checkpoint is None:
            return None
        expanded = os.path.expandvars(str(self.checkpoint))
        if "$" in expanded:
            raise ModelError(f"checkpoint {str(self.checkpoint)!r} names an environment variable that is not set "
                             f"(still {expanded!r} after expansion)")
        return Path(expanded)


def is_pretrained(spec: ModelSpec) -> bool:
    """Whether the builder itself loads trained weights: Hugging Face models come from their directory."""
    return spec.name == _HF_NAME or spec.name.startswith(_HF_PREFIX)


def load_model(spec: ModelSpec) -> nn.Module:
    """Build the model a spec describes, load its checkpoint if any, and switch to eval mode.

    Args:
        spec: The model spec.

    Returns:
        The model in ``eval()`` mode.

    Raises:
        ModelError: Unknown name, bad keyword arguments, a builder that does not return a
            module, or a checkpoint that is missing or does not match the model.
    """
    builder = _resolve_builder(spec.name)
    model = _call_builder(spec.name, builder, spec.kwargs)
    checkpoint = spec.checkpoint_path()
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model.eval()


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a weights file into ``model``; its state dict must match exactly.

    ``.safetensors`` files are read with safetensors (spiralkit's sparse encoding is detected
    from the file's metadata); any other file with ``torch.load(path, map_location="cpu",
    weights_only=True)``, which may hold the state dict itself or a dict with a
    ``"state_dict"`` entry.

    Args:
        model: The module to load into (in place).
        path: The weights file.

    Raises:
        ModelError: The file is missing or unreadable, holds pickled objects, or its keys
            or shapes differ from the model's.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    state = load_state(path) if path.suffix == ".safetensors" else _load_torch_state(path)
    _check_state_matches(model, state, path)
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- builders


def imports_code(name: str) -> bool:
    """Whether model ``name`` is a ``package.module:function`` to import and call (not a zoo or source name)."""
    prefix, colon, _ = name.partition(":")
    return bool(colon) and prefix not in MODEL_SOURCES


def _resolve_builder(name: str) -> Callable[..., Any]:
    """The callable that builds the model called ``name``: a `MODEL_SOURCES` prefix, an import, or a `ZOO` name."""
    prefix, colon, rest = name.partition(":")
    if colon:
        source = MODEL_SOURCES.get(prefix)
        return source(rest) if source is not None else _import_builder(name)
    if name == _HF_NAME:
        return hf_model
    if name in ZOO:
        return ZOO[name]
    close = difflib.get_close_matches(name, ZOO.keys(), n=3)
    hint = f" (did you mean {_quoted(close)}?)" if close else ""
    raise ModelError(
        f"unknown model {name!r}{hint}; built-in models: {', '.join(ZOO)}; "
        "or use 'torchvision:NAME', 'timm:NAME', 'hf:ALIAS', 'hf' (kwargs.path) or 'package.module:function'"
    )


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    """A builder for torchvision model ``name`` that never downloads weights."""
    import torchvision  # deferred: importing torchvision costs about a second

    available = torchvision.models.list_models()
    if name not in available:
        close = difflib.get_close_matches(name, available, n=_MAX_LISTED, cutoff=0.5)
        hint = f"close matches: {_quoted(close)}" if close else "see torchvision.models.list_models()"
        raise ModelError(f"unknown torchvision model {name!r}; {hint}")

    def build(**kwargs: Any) -> nn.Module:
        if "weights" in kwargs:
            raise ModelError(
                f"model 'torchvision:{name}': the 'weights' kwarg is not allowed (nothing is "
                "downloaded); give a local file as the spec's checkpoint instead"
            )
        return torchvision.models.get_model(name, weights=None, **kwargs)

    return build


# timm.create_model arguments that fetch or read weights by themselves: weights come only from
# the spec's checkpoint (weights-only files, never downloaded).
_TIMM_WEIGHT_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path")


def _timm_builder(name: str) -> Callable[..., nn.Module]:
    """A builder for timm model ``name`` (``timm.create_model(name, pretrained=False, **kwargs)``)."""
    import timm  # deferred: importing timm costs about a second

    if not timm.is_model(name):
        available = timm.list_models()
        close = difflib.get_close_matches(name, available, n=_MAX_LISTED, cutoff=0.5)
        hint = f"close matches: {_quoted(close)}" if close else "see timm.list_models()"
        raise ModelError(f"unknown timm model {name!r}; {hint}")

    def build(**kwargs: Any) -> nn.Module:
        given = [key for key in _TIMM_WEIGHT_KWARGS if key in kwargs]
        if given:
            raise ModelError(
                f"model 'timm:{name}': the {_quoted(given)} kwarg is not allowed (nothing is downloaded "
                "and timm does not load weights here); give a local weights file as the spec's checkpoint instead"
            )
        return timm.create_model(name, pretrained=False, **kwargs)

    return build


MODEL_SOURCES: Mapping[str, Callable[[str], Callable[..., Any]]] = types.MappingProxyType(
    {
        "torchvision": _torchvision_builder,
        "timm": _timm_builder,
        "hf": packaged_builder,
    }
)
"""Model sources by the prefix of ``PREFIX:NAME``: each gives the builder of ``NAME`` (read-only).

Any other ``a.b:c`` name is imported (``package.module:function``).
"""


def _import_builder(name: str) -> Callable[..., Any]:
    """Import ``package.module:function`` (the function part may be dotted)."""
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise ModelError(f"model {name!r} must look like 'package.module:function'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"model {name!r}: cannot import module {module_name!r}: {exc}") from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelError(f"model {name!r}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelError(f"model {name!r}: {attribute!r} is a {type(target).__name__}, not a callable")
    return target


def _call_builder(name: str, builder: Callable[..., Any], kwargs: Mapping[str, Any]) -> nn.Module:
    """Call ``builder(**kwargs)``, turning argument errors into `ModelError`."""
    _check_kwargs(name, builder, kwargs)
    try:
        model = builder(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"bad arguments for model {name!r} (kwargs {dict(kwargs)!r}): {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _check_kwargs(name: str, builder: Callable[..., Any], kwargs: Mapping[str, Any]) -> None:
    """Check kwargs against the builder's signature, for a message that lists what it takes."""
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        accepted = ", ".join(p.name for p in signature.parameters.values() if p.kind in kinds) or "none"
        raise ModelError(f"bad arguments for model {name!r}: {exc} (accepted: {accepted})") from exc


# --------------------------------------------------------------------------- checkpoints


def _load_torch_state(path: Path) -> Mapping[str, Tensor]:
    """Read a torch file with ``weights_only=True`` and return its state dict."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"checkpoint {path} cannot be loaded: only weights_only files are accepted "
            f"(a state dict of tensors, or a .safetensors file); {_unpickler_reason(exc)}"
        ) from exc
    except (RuntimeError, OSError, EOFError) as exc:
        raise ModelError(f"checkpoint {path} is not a readable torch file: {exc}") from exc
    if isinstance(loaded, Mapping) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ModelError(f"checkpoint {path} holds a {type(loaded).__name__}, not a state dict of tensors")
    return loaded


def _unpickler_reason(exc: Exception) -> str:
    """The short reason inside torch's long weights-only error message."""
    match = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
    reason = match.group(1) if match else str(exc).splitlines()[0]
    return reason.split(". Please")[0].strip()


def _check_state_matches(model: nn.Module, state: Mapping[str, Tensor], path: Path) -> None:
    """Raise a `ModelError` naming the first differing keys or shapes."""
    expected = model.state_dict()
    missing = [repr(key) for key in expected if key not in state and not _optional(key)]
    unexpected = [repr(key) for key in state if key not in expected]
    mismatched = [
        f"{key!r} is {tuple(state[key].shape)} in the checkpoint but {tuple(value.shape)} in the model"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    problems = [
        f"{label} {_first(items)}"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched))
        if items
    ]
    if problems:
        raise ModelError(f"checkpoint {path} does not match the model: " + "; ".join(problems))


def _optional(key: str) -> bool:
    """Whether a state-dict entry may be missing from a checkpoint: BatchNorm's ``num_batches_tracked``.

    Checkpoints saved before PyTorch 0.4.1 (or stripped of it, like akamaster's CIFAR
    ResNets) lack the counter; it only matters for ``momentum=None``, and BatchNorm's own
    loading fills it in, so it is no reason to refuse the weights.
    """
    return key == "num_batches_tracked" or key.endswith(".num_batches_tracked")


def _first(items: list[str]) -> str:
    """The first few items and how many more there are."""
    more = len(items) - _MAX_LISTED
    return ", ".join(items[:_MAX_LISTED]) + (f" and {more} more" if more > 0 else "")


def _quoted(items: list[str]) -> str:
    """``'a', 'b'``."""
    return ", ".join(repr(item) for item in items)
