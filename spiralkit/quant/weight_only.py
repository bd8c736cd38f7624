"""Weight-only quantization: int8, int4 or int3 weights, float activations.

Each ``nn.Linear`` / ``nn.Conv2d`` weight is quantized symmetrically (``z = 0``, restricted
signed range: int8 codes in ``[−127, 127]``, int4 codes in ``[−7, 7]``), per output channel
(int8 default) or per group of ``group_size`` consecutive input weights (int4 default 32:
with only 15 levels a scale must follow the weights closely; one float32 scale per 32
weights adds 1 bit per weight). A Conv2d weight ``(out, in, kh, kw)`` is treated as the
matrix ``(out, in·kh·kw)`` so groups run along its flattened input dimension. Int4 codes are
packed two per byte (`pack_int4`). Int3 codes (``[−3, 3]``, GPTQ's 3 bits) are stored exactly like
int4 codes, two per byte: the format stays one, at 4 bits of storage per 3-bit code.

**Format** (what `WeightOnlyLinear`/`WeightOnlyConv2d` hold as buffers, and what their state
dict saves): ``qweight`` — the codes of the weight viewed as ``(out, in)``, row-major, ``int8``
for 8 bits or ``uint8`` nibble-packed for 3/4 bits (`pack_int4`); ``scale`` — float32,
``(out,)`` per output channel or ``(out, ceil(in / group_size))`` per group of
``group_size`` consecutive input columns in the original column order; ``W = q · s``. The
codes need not come from rounding: GPTQ (`spiralkit.quant.gptq`) chooses them itself on the
same grid and builds the modules from its codes (``codes=``, ``scale=``).

**File** (`save_weight_only` / `load_weight_only`; the run directory's
``model.weight-only.safetensors``): the quantized model's whole state dict as safetensors —
each quantized layer's ``<layer>.qweight`` and ``<layer>.scale`` as above, every other tensor
(biases, norms, embeddings, float layers) as it is — with the metadata
``{"format": "spiralkit.weight-only/1", "layers": {name: {"bits", "group_size", "shape"}}}``.
It is loaded into the float model's architecture (the recipe's model, with any structured
plans replayed): the listed layers become weight-only modules holding the stored codes, then
the state dict is loaded strictly, so the reloaded model is bit-identical.

The replacement modules (`WeightOnlyLinear`, `WeightOnlyConv2d`) keep the packed codes and
scales as buffers and dequantize on the fly in ``forward``: ``W = q · s`` then an ordinary
float ``linear``/``conv2d``. This is about storage — weights 4x smaller (int8) or 6.4x
(int4, groups of 32) — and correctness first; it is not faster than float on the CPU.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from spiralkit.errors import StorageError
from spiralkit.export.weights import atomic_write_bytes

from spiralkit.patterns import first_unmatched, matches_any
from spiralkit.quant.affine import (
    PerChannel,
    PerGroup,
    QuantError,
    QuantSpec,
    choose_qparams,
    dequantize,
    quantize,
)

__all__ = [
    "WEIGHT_ONLY_FORMAT",
    "WeightOnlyConfig",
    "WeightOnlyConv2d",
    "WeightOnlyLinear",
    "pack_int4",
    "load_weight_only",
    "quantize_weights_",
    "save_weight_only",
    "unpack_int4",
]

WEIGHT_ONLY_FORMAT = "spiralkit.weight-only/1"

DEFAULT_INT4_GROUP = 32


def default_group_size(data: Any, *, bits: int) -> Any:
    """A config's raw input with ``group_size`` filled in when it is not given: 32 for 3 and 4 bits.

    ``bits`` is the config's default bit width, used when ``data`` names none. Every config
    holding ``bits``/``group_size`` validates its input through this, before its fields.
    """
    if isinstance(data, dict) and "group_size" not in data and data.get("bits", bits) in (3, 4):
        return {**data, "group_size": DEFAULT_INT4_GROUP}
    return data


class WeightOnlyConfig(BaseModel):
    """Weight-only quantization of Linear and Conv2d layers.

    Attributes:
        bits: 8 (int8 codes), 4 (int4 codes packed two per byte) or 3 (int3 codes, stored
            like int4).
        group_size: Input weights sharing one scale; ``None`` means one scale per output
            channel. When not given: 32 for 3 and 4 bits, per channel for 8 bits.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["weight-only"] = "weight-only"
    bits: Literal[3, 4, 8] = 8
    group_size: int | None = Field(default=None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _default_group_size(cls, data: Any) -> Any:
        return default_group_size(data, bits=8)

    @property
    def spec(self) -> QuantSpec:
        """The affine spec of the (2-D) weight matrix."""
        granularity = PerChannel(axis=0) if self.group_size is None else PerGroup(size=self.group_size)
        return QuantSpec(bits=self.bits, symmetric=True, signed=True, granularity=granularity)


# --------------------------------------------------------------------------- int4 packing


def pack_int4(q: Tensor) -> Tensor:
    """Pack signed 4-bit codes two per byte.

    Element ``2i`` goes to the low nibble of byte ``i``, element ``2i + 1`` to the high
    nibble (two's complement). An odd count leaves the last high nibble zero.

    Args:
        q: Integer tensor with values in ``[−8, 7]`` (any shape; flattened in row-major order).

    Returns:
        ``uint8`` tensor of ``ceil(q.numel() / 2)`` bytes.

    Raises:
        QuantError: A value is outside ``[−8, 7]`` or ``q`` is not an integer tensor.
    """
    if q.is_floating_point() or q.dtype == torch.bool:
        raise QuantError(f"pack_int4 needs an integer tensor, got {q.dtype}")
    flat = q.reshape(-1).to(torch.int16)
    if flat.numel() and (int(flat.min()) < -8 or int(flat.max()) > 7):
        raise QuantError(f"pack_int4: values must be in [-8, 7], got [{int(flat.min())}, {int(flat.max())}]")
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    nibbles = (flat & 0xF).reshape(-1, 2)
    return (nibbles[:, 0] | (nibbles[:, 1] << 4)).to(torch.uint8)


def unpack_int4(packed: Tensor, numel: int) -> Tensor:
    """Exact inverse of `pack_int4`: the first ``numel`` signed 4-bit codes as ``int8``.

    Raises:
        QuantError: ``packed`` is not ``uint8`` or does not hold ``numel`` codes.
    """
    if packed.dtype != torch.uint8:
        raise QuantError(f"unpack_int4 needs a uint8 tensor, got {packed.dtype}")
    if not 2 * packed.numel() - 1 <= numel <= 2 * packed.numel() and not (numel == 0 == packed.numel()):
        raise QuantError(f"unpack_int4: {packed.numel()} bytes cannot hold exactly {numel} int4 codes")
    flat = packed.reshape(-1).to(torch.int16)
    nibbles = torch.stack([flat & 0xF, flat >> 4], dim=1).reshape(-1)[:numel]
    return ((nibbles ^ 8) - 8).to(torch.int8)  # sign-extend the 4-bit two's complement


# --------------------------------------------------------------------------- modules


def _quantize_matrix(weight: Tensor, config: WeightOnlyConfig, name: str) -> tuple[Tensor, Tensor]:
    """Codes (packed for int4) and scales of a weight viewed as ``(out, in)``."""
    matrix = weight.detach().reshape(weight.shape[0], -1)
    spec = config.spec
    scale, zero_point = choose_qparams(matrix, spec, name=name)
    codes = quantize(matrix, scale, zero_point, spec, name=name)
    return (pack_int4(codes) if config.bits <= 4 else codes), scale


def _dequantize_matrix(
    qweight: Tensor, scale: Tensor, *, shape: tuple[int, ...], config: WeightOnlyConfig, dtype: torch.dtype
) -> Tensor:
    """Inverse of `_quantize_matrix`: ``W = q · s`` in the original shape and dtype."""
    rows, cols = shape[0], math.prod(shape[1:])
    codes = qweight if config.bits == 8 else unpack_int4(qweight, rows * cols)
    zero_point = torch.zeros_like(scale, dtype=torch.int32)
    weight = dequantize(codes.reshape(rows, cols), scale, zero_point, granularity=config.spec.granularity)
    return weight.reshape(shape).to(dtype)


def _given_codes(
    codes: Tensor, scale: Tensor, *, shape: tuple[int, ...], config: WeightOnlyConfig, name: str
) -> tuple[Tensor, Tensor]:
    """Check codes ``(out, in)`` and scales chosen elsewhere (GPTQ) against ``config``; pack them like ours."""
    rows, cols = shape[0], math.prod(shape[1:])
    spec = config.spec
    expected = (rows,) if config.group_size is None else (rows, math.ceil(cols / config.group_size))
    if tuple(codes.shape) != (rows, cols) or tuple(scale.shape) != expected:
        raise QuantError(f"layer {name!r}: codes {tuple(codes.shape)} and scales {tuple(scale.shape)} do not fit "
                         f"its weight {shape} (expected codes {(rows, cols)}, scales {expected})")
    if codes.numel() and (int(codes.min()) < spec.qmin or int(codes.max()) > spec.qmax):
        raise QuantError(f"layer {name!r}: {config.bits}-bit codes must be in [{spec.qmin}, {spec.qmax}], "
                         f"got [{int(codes.min())}, {int(codes.max())}]")
    codes = codes.to(torch.int8)
    return (pack_int4(codes) if config.bits <= 4 else codes), scale.detach().float().clone()


class _WeightOnly(nn.Module):
    """Buffers and dequantization shared by `WeightOnlyLinear` and `WeightOnlyConv2d`."""

    qweight: Tensor
    scale: Tensor

    def __init__(self, layer: nn.Linear | nn.Conv2d, config: WeightOnlyConfig, *, name: str,
                 codes: Tensor | None = None, scale: Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        self.weight_shape = tuple(layer.weight.shape)
        self.weight_dtype = layer.weight.dtype
        if codes is None or scale is None:
            qweight, scale = _quantize_matrix(layer.weight, config, f"{name}.weight")
        else:
            qweight, scale = _given_codes(codes, scale, shape=self.weight_shape, config=config, name=name)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    @property
    def weight(self) -> Tensor:
        """The dequantized float weight ``q · s`` (recomputed on every access)."""
        return _dequantize_matrix(
            self.qweight, self.scale, shape=self.weight_shape, config=self.config, dtype=self.weight_dtype
        )

    def _describe_codes(self) -> str:
        group = "per-channel" if self.config.group_size is None else f"group_size={self.config.group_size}"
        return f"int{self.config.bits}, {group}"


class WeightOnlyLinear(_WeightOnly):
    """``nn.Linear`` with int8/int4 weights, dequantized on the fly (see the module docstring).

    Buffers: ``qweight`` (``int8`` codes ``(out, in)``, or ``uint8`` with two int4 codes per
    byte) and ``scale`` (float32, ``(out,)`` per channel or ``(out, ceil(in / group_size))``);
    the bias stays a float parameter. ``layer.weight`` is the dequantized weight.

    Args:
        linear: The float layer (not modified).
        config: Bits and group size.
        name: The layer's name, for error messages.
        codes, scale: Codes ``(out, in)`` and scales chosen elsewhere (GPTQ); when not given,
            the weight is rounded to the nearest code.
    """

    def __init__(self, linear: nn.Linear, config: WeightOnlyConfig, *, name: str = "linear",
                 codes: Tensor | None = None, scale: Tensor | None = None) -> None:
        super().__init__(linear, config, name=name, codes=codes, scale=scale)
        self.in_features = linear.in_features
        self.out_features = linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        """``x Wᵀ + b`` with ``W`` dequantized to ``x``'s dtype."""
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self._describe_codes()}"
        )


class WeightOnlyConv2d(_WeightOnly):
    """``nn.Conv2d`` (``padding_mode="zeros"``) with int8/int4 weights, dequantized on the fly.

    The weight ``(out, in/groups, kh, kw)`` is stored as the matrix ``(out, in/groups·kh·kw)``
    (buffers as in `WeightOnlyLinear`).

    Args:
        conv: The float layer (not modified).
        config: Bits and group size.
        name: The layer's name, for error messages.
        codes, scale: Codes ``(out, in/groups·kh·kw)`` and scales chosen elsewhere (GPTQ);
            when not given, the weight is rounded to the nearest code.

    Raises:
        QuantError: The layer pads other than with zeros, or given codes do not fit it.
    """

    def __init__(self, conv: nn.Conv2d, config: WeightOnlyConfig, *, name: str = "conv",
                 codes: Tensor | None = None, scale: Tensor | None = None) -> None:
        if conv.padding_mode != "zeros":
            raise QuantError(
                f"layer {name!r}: weight-only Conv2d supports padding_mode='zeros', got {conv.padding_mode!r}; "
                "exclude the layer to keep it in float"
            )
        super().__init__(conv, config, name=name, codes=codes, scale=scale)
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.groups = conv.groups

    def forward(self, x: Tensor) -> Tensor:
        """The convolution with the dequantized weight."""
        return F.conv2d(x, self.weight.to(x.dtype), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.weight_shape[2:]}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"bias={self.bias is not None}, {self._describe_codes()}"
        )


# --------------------------------------------------------------------------- the verb


def quantize_weights_(
    model: nn.Module, config: WeightOnlyConfig, *, exclude: Sequence[str] = ()
) -> dict[str, int]:
    """Replace every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` by its weight-only version.

    Args:
        model: Modified in place (a container; the model itself cannot be replaced).
        config: Bits and group size.
        exclude: ``fnmatch`` patterns of layer names to keep in float (``"fc3"``,
            ``"layer*.conv1"``); each must match at least one Linear/Conv2d layer.

    Returns:
        Bits per layer name: ``config.bits`` for quantized layers, the float width (32 for
        float32) for excluded ones.

    Raises:
        QuantError: ``model`` has no Linear/Conv2d layer below it, or an exclude pattern
            matches none.
    """
    layers = {name: m for name, m in model.named_modules() if name and isinstance(m, (nn.Linear, nn.Conv2d))}
    if not layers:
        raise QuantError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d submodule to quantize")
    if (pattern := first_unmatched(exclude, layers)) is not None:
        raise QuantError(f"exclude pattern {pattern!r} matches no Linear/Conv2d layer; layers are: {', '.join(layers)}")
    bits: dict[str, int] = {}
    replacements: dict[int, nn.Module] = {}
    for name, layer in layers.items():
        if matches_any(name, exclude):
            bits[name] = layer.weight.element_size() * 8
            continue
        cls = WeightOnlyLinear if isinstance(layer, nn.Linear) else WeightOnlyConv2d
        replacements[id(layer)] = cls(layer, config, name=name)
        bits[name] = config.bits
    _swap(model, replacements)
    return bits


def _swap(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Point every reference to a replaced layer (shared layers included) at its new module."""
    for parent in list(model.modules()):
        # `_modules`, not `named_children()`: the latter lists a child held twice only once.
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])


# --------------------------------------------------------------------------- storage


def _unpacked(qweight: Tensor, shape: Sequence[int], bits: int) -> Tensor:
    """Stored codes as ``(out, in)`` ``int8`` (unpacked for 3/4 bits)."""
    rows, cols = shape[0], math.prod(shape[1:])
    return (qweight if bits == 8 else unpack_int4(qweight, rows * cols)).reshape(rows, cols)


def save_weight_only(model: nn.Module, path: Path) -> int:
    """Save a model holding weight-only layers in the documented file format; returns the bytes written.

    Raises:
        QuantError: ``model`` holds no weight-only layer.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _WeightOnly)}
    if not layers:
        raise QuantError(f"{type(model).__name__} holds no weight-only layer to save")
    layout = {name: {"bits": m.config.bits, "group_size": m.config.group_size, "shape": list(m.weight_shape)}
              for name, m in layers.items()}
    # Clones: safetensors refuses tensors sharing memory (tied weights are stored twice).
    state = {name: t.detach().contiguous().clone() for name, t in model.state_dict().items()}
    data = save_safetensors(state, metadata={"format": WEIGHT_ONLY_FORMAT, "layers": json.dumps(layout)})
    atomic_write_bytes(Path(path), data)
    return len(data)


def load_weight_only(path: Path, model: nn.Module) -> nn.Module:
    """Load a `save_weight_only` file into ``model`` (the float architecture), in place; returns it.

    Raises:
        StorageError: the file is missing, not a weight-only file, or does not fit ``model``
            (the message names the layer or key).
    """
    try:
        data = Path(path).read_bytes()
        state = load_safetensors(data)
        metadata = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]).get("__metadata__", {})
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (SafetensorError, ValueError) as exc:
        raise StorageError(f"{path} is not a safetensors file: {exc}") from None
    if metadata.get("format") != WEIGHT_ONLY_FORMAT:
        raise StorageError(f"{path} is not a spiralkit weight-only file (format {metadata.get('format')!r}, "
                           f"expected {WEIGHT_ONLY_FORMAT!r})")
    modules = dict(model.named_modules())
    replacements: dict[int, nn.Module] = {}
    for name, entry in json.loads(metadata["layers"]).items():
        layer = modules.get(name)
        if not isinstance(layer, (nn.Linear, nn.Conv2d)) or list(layer.weight.shape) != entry["shape"]:
            found = "no such layer" if layer is None else f"a {type(layer).__name__}" + (
                f" of weight shape {tuple(layer.weight.shape)}" if hasattr(layer, "weight") else "")
            raise StorageError(f"{path}: layer {name!r} holds a weight-only {tuple(entry['shape'])} weight, "
                               f"the model has {found}")
        if f"{name}.qweight" not in state or f"{name}.scale" not in state:
            raise StorageError(f"{path}: layer {name!r} is listed as weight-only but its qweight/scale are not stored")
        config = WeightOnlyConfig(bits=entry["bits"], group_size=entry["group_size"])
        codes = _unpacked(state[f"{name}.qweight"], entry["shape"], config.bits)
        cls = WeightOnlyLinear if isinstance(layer, nn.Linear) else WeightOnlyConv2d
        replacements[id(layer)] = cls(layer, config, name=name, codes=codes, scale=state[f"{name}.scale"])  # type: ignore[arg-type]
    _swap(model, replacements)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise StorageError(f"{path} does not fit the model: {str(exc).splitlines()[0]} "
                           f"{' '.join(str(exc).split()[-12:])}") from None
    return model
