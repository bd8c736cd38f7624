"""Quantization-aware training, prepare and convert: fake-quantized Conv2d/Linear, QDQ export.

`prepare_qat` copies a float model and swaps every ``nn.Conv2d`` / ``nn.Linear`` (except
those named in `QATConfig.keep_float`) for a wrapper (`QATConv2d`, `QATLinear`) that
computes with fake-quantized tensors (Jacob et al. 2018, "Quantization and Training of
Neural Networks for Efficient Integer-Arithmetic-Only Inference")::

    x̂ = (clamp(round(x / s) + z, qmin, qmax) − z) · s

* **weights**: symmetric (``z = 0``), per output channel by default, over the signed range
  ``[−2^(b−1), 2^(b−1) − 1]``; the scale is ``s = max|w| / (2^(b−1) − 1)``, recomputed from
  the current weights at every forward (min/max), so ``−2^(b−1)`` is never used unless LSQ
  shrinks the scale. The full signed range (rather than the restricted ``[−127, 127]`` of
  `spiralkit.quant.affine`) is used because ONNX ``QuantizeLinear`` clamps int8 to
  ``[−128, 127]``, and PyTorch and ONNX Runtime must compute the same codes.
* **activations** (``quantize_activations``): the input *and* the output of every wrapped
  layer, per tensor, unsigned affine over ``[0, 2^b − 1]``, with ranges calibrated by a
  min/max observer (`spiralkit.quant.calibrate.Observer`) on the float model. The outputs
  are quantized too because ONNX Runtime fuses ``DequantizeLinear → Conv/Gemm →
  QuantizeLinear`` into one integer kernel (``QLinearConv``, ``QGemm``) only when a
  ``QuantizeLinear`` follows the op directly; a max-pool or a flatten between a layer and
  the next layer's input quantizer would otherwise leave the layer in float.

* **bias** (when the input is quantized): on the grid of the integer kernel's int32
  accumulator, ``b̂ = round(b / (s_x·s_w)) · s_x·s_w``, as the integer kernel adds it.

Gradients pass the rounding by the straight-through estimator (Bengio et al. 2013):
``∂x̂/∂x = 1`` inside the code range, 0 where clamped. With ``learn_scales`` every scale is
a parameter trained by LSQ (Esser et al. 2020, "Learned Step Size Quantization"), with the
paper's gradient scale ``g = 1 / sqrt(N · qmax)`` (``N`` elements share the scale: one
output channel's weights, or one example's features).

Every training quantizer computes with spiralkit's one fake-quantizer,
`spiralkit.quant.affine.fake_quantize` (and `lsq_fake_quantize` for learned scales): ``x / s``
is a true division, as in ONNX's ``QuantizeLinear``. For the ONNX export (8 bits only:
``QuantizeLinear`` is int8/uint8), `freeze_qat` makes a copy in which every quantizer is
replaced by an *export-only* form holding its current scale as a constant, written with ops
torch's dynamo exporter turns into ``QuantizeLinear → DequantizeLinear`` (they are not
training quantizers: no gradient reaches the scales):

* per-channel quantizers become `ExportChannelFakeQuant`
  (``torch.fake_quantize_per_channel_affine``, exported as is);
* per-tensor quantizers become `ExportFakeQuant`: torch's ``quantized_decomposed``
  quantize/dequantize pair with Python-number qparams. ``torch.fake_quantize_per_tensor_affine``
  itself exports only with a *static* batch size (torch 2.14: its ``cachemask`` decomposition
  has no fake kernel for symbolic shapes; the TorchScript exporter, ``dynamo=False``, handles
  it but is deprecated and slated for removal);
* learned (LSQ) scales are copied; frozen, they are plain quantizers.

Run eagerly in PyTorch, the export forms multiply by ``1 / s`` (torch's kernels), so where
``x / s`` sits within float rounding of a half-integer they may round one step away from the
training quantizer; the ONNX file itself divides, as the training quantizer does.

A model trained at 2–7 bits does not export; it is evaluated in PyTorch, where its
fake-quantized forward *is* the b-bit model.

QAT is two steps here, as torchao's ``QATConfig(step="prepare" | "convert")``: `prepare_qat`
(fake-quantized layers, calibrated activation ranges) and `export_qat_onnx` (`freeze_qat`, then
the QDQ export). Training the prepared model is the caller's: `spiralkit.spiral.qat.qat`
is the spiral's recovery by logit distillation.

On x86 CPUs without VNNI ONNX Runtime's U8S8 kernels saturate on full-range int8 weights
(`spiralkit.cpu`), so ``reduce_range`` (``"auto"`` by default: exactly on such a CPU) trains
8-bit models with 7-bit weights, codes in ``[−64, 63]``; the export writes them as int8
(`freeze_qat` clamps each weight to its codes' range), which every CPU runs exactly.

Limitations: BatchNorm after a convolution stays a float op (it is not folded into the
quantized weights; fold it before QAT for integer-only inference).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import singledispatch
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, field_validator
from torch import Tensor, nn

from spiralkit.cpu import ReduceRange, resolve_reduce_range
from spiralkit.export.onnx import export_onnx
from spiralkit.patterns import first_unmatched, matches_any
from spiralkit.quant.affine import (
    PerChannel,
    PerTensor,
    QuantError,
    QuantSpec,
    check_bits,
    fake_quantize,
    lsq_fake_quantize,
)
from spiralkit.quant.calibrate import MinMax, Observer
from spiralkit.quant.weight_only import _swap

__all__ = [
    "ExportChannelFakeQuant",
    "ExportFakeQuant",
    "FakeQuant",
    "LearnedFakeQuant",
    "MinMaxWeightQuant",
    "QATConfig",
    "QATConv2d",
    "QATLinear",
    "export_qat_onnx",
    "freeze_qat",
    "prepare_qat",
]

EXPORT_BITS = 8
_ONNX_RANGES = {(0, 255): torch.uint8, (-128, 127): torch.int8}
SCALE_FLOOR = torch.finfo(torch.float32).eps
"""Smallest scale used. The export forms run torch's kernels, which multiply by ``1 / s``; a
subnormal ``s`` would give ``0 · inf = NaN`` on an all-zero (e.g. pruned) channel, so the
floor is float32's epsilon, for the training quantizers too (the frozen copy keeps their scales)."""


class QATConfig(BaseModel):
    """How `prepare_qat` fake-quantizes Conv2d and Linear layers (quantization settings only).

    Training settings belong to the caller (the spiral's `spiralkit.spiral.qat.QATRecovery`
    extends this config with them).

    Attributes:
        bits: Bit width of the weights, 2..8 (8 is the only width that exports to ONNX).
        activation_bits: Bit width of the activations; None means ``bits``.
        per_channel: One weight scale per output channel (else one per tensor).
        learn_scales: Train every scale by LSQ (Esser et al. 2020) instead of min/max.
        quantize_activations: Fake-quantize each wrapped layer's input and output; off
            gives weight-only QAT (which does not export to integer kernels).
        keep_float: ``fnmatch`` patterns of layer names left in float (``"fc2"``,
            ``"layer1.*"``); each must match a Conv2d/Linear layer.
        reduce_range: At 8 bits, weights on 7 (codes in ``[−64, 63]``) so that ONNX
            Runtime's U8S8 kernels cannot saturate; ``"auto"``: exactly on x86 CPUs without
            VNNI (`spiralkit.cpu.int8_saturates`). Lower bit widths are not changed.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["qat"] = "qat"
    bits: int = 8
    activation_bits: int | None = None
    per_channel: bool = True
    learn_scales: bool = False
    quantize_activations: bool = True
    keep_float: tuple[str, ...] = ()
    reduce_range: ReduceRange = "auto"

    @field_validator("bits", "activation_bits")
    @classmethod
    def _bits_in_range(cls, bits: int | None) -> int | None:
        if bits is not None:
            try:
                check_bits(bits)
            except QuantError as exc:
                raise ValueError(str(exc)) from None
        return bits

    @property
    def act_bits(self) -> int:
        """The activations' bit width (``activation_bits``, else ``bits``)."""
        return self.bits if self.activation_bits is None else self.activation_bits

    @property
    def weight_bits(self) -> int:
        """The weights' code width: ``bits``, or 7 for a reduced-range 8-bit model."""
        return EXPORT_BITS - 1 if self.bits == EXPORT_BITS and resolve_reduce_range(self.reduce_range) else self.bits


# --------------------------------------------------------------------------- quantizers


def _signed_range(bits: int) -> tuple[int, int]:
    """``[−2^(b−1), 2^(b−1) − 1]``: what ONNX int8 means at 8 bits."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _range_spec(qmin: int, qmax: int, axis: int | None) -> QuantSpec:
    """The `QuantSpec` whose code range is ``[qmin, qmax]`` (full signed or unsigned), one scale per ``axis``.

    Raises:
        QuantError: ``[qmin, qmax]`` is not ``[−2^(b−1), 2^(b−1) − 1]`` or ``[0, 2^b − 1]``.
    """
    granularity = PerTensor() if axis is None else PerChannel(axis=axis)
    spec = QuantSpec(bits=check_bits((qmax - qmin).bit_length()), symmetric=False, signed=qmin < 0,
                     granularity=granularity)
    if (spec.qmin, spec.qmax) != (qmin, qmax):
        raise QuantError(f"QAT code ranges are [-2^(b-1), 2^(b-1) - 1] or [0, 2^b - 1], not [{qmin}, {qmax}]")
    return spec


def _lsq_grad_factor(x: Tensor, scales: int, qmax: int, *, batch_dim: bool) -> float:
    """LSQ's ``g = 1 / sqrt(N · qmax)``, ``N`` = elements per scale (per example for activations)."""
    count = x.numel() // max(scales, 1)
    if batch_dim and x.dim() > 1:
        count //= max(x.shape[0], 1)
    return 1.0 / math.sqrt(max(count, 1) * max(qmax, 1))


class FakeQuant(nn.Module):
    """Fake quantization with fixed scale(s) and zero point(s) (buffers).

    ``x̂ = (clamp(round(x / s) + z, qmin, qmax) − z) · s`` with a straight-through gradient
    (1 inside the range, 0 where clamped), by `spiralkit.quant.affine.fake_quantize`.
    `freeze_qat` replaces it by an export form (`ExportFakeQuant`, `ExportChannelFakeQuant`).

    Args:
        scale: Scale(s): shape ``(1,)`` per tensor, ``(C,)`` per channel.
        zero_point: Integer zero point(s), same shape.
        qmin: Smallest code.
        qmax: Largest code.
        axis: The channel axis, or None for one scale per tensor.
    """

    scale: Tensor
    zero_point: Tensor

    def __init__(self, scale: Tensor, zero_point: Tensor, *, qmin: int, qmax: int, axis: int | None) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().float().reshape(-1).clamp(min=SCALE_FLOOR).clone())
        self.register_buffer("zero_point", zero_point.detach().reshape(-1).to(torch.int32).clone())
        self.qmin, self.qmax, self.axis = qmin, qmax, axis
        self.spec = _range_spec(qmin, qmax, axis)

    @property
    def bits(self) -> int:
        """Bit width of the code range."""
        return self.spec.bits

    def forward(self, x: Tensor) -> Tensor:
        """The fake-quantized ``x``."""
        return fake_quantize(x, self.scale, self.zero_point, self.spec, reject_nonfinite=False)

    def extra_repr(self) -> str:
        granularity = "per-tensor" if self.axis is None else f"per-channel axis={self.axis}"
        return f"[{self.qmin}, {self.qmax}], {granularity}"


class LearnedFakeQuant(FakeQuant):
    """`FakeQuant` whose scale is a parameter learned by LSQ (Esser et al. 2020).

    Uses `spiralkit.quant.affine.lsq_fake_quantize`: the value is that of `FakeQuant`; with
    ``v = x / s`` the scale's gradient is ``round(v) − v`` inside the range, ``qmin − z``
    below and ``qmax − z`` above, times ``g = 1 / sqrt(N · qmax)`` (``N`` elements share the
    scale; for activations, per example). The zero point stays fixed. The scale is kept
    ``≥`` float32's epsilon (clamped before each forward, as torch.ao's
    ``_LearnableFakeQuantize`` does). `freeze_qat` replaces it by an export form.
    """

    def __init__(self, scale: Tensor, zero_point: Tensor, *, qmin: int, qmax: int, axis: int | None) -> None:
        super().__init__(scale, zero_point, qmin=qmin, qmax=qmax, axis=axis)
        scale_value = self.scale
        del self.scale
        self.scale = nn.Parameter(scale_value)

    def forward(self, x: Tensor) -> Tensor:
        """The fake-quantized ``x``; the scale gets LSQ gradients."""
        with torch.no_grad():
            self.scale.clamp_(min=SCALE_FLOOR)
        grad = _lsq_grad_factor(x, self.scale.numel(), self.qmax, batch_dim=self.axis is None)
        return lsq_fake_quantize(x, self.scale, self.zero_point, self.spec, grad_scale=grad, reject_nonfinite=False)


class ExportFakeQuant(nn.Module):
    """Per-tensor fake quantization with constant qparams, in the form ONNX export needs.

    ``x̂ = dequantize(quantize(x))`` by torch's ``quantized_decomposed.quantize_per_tensor``
    / ``dequantize_per_tensor`` with Python-number scale and zero point, written by the
    dynamo exporter as ``QuantizeLinear → DequantizeLinear`` with a dynamic batch dimension.
    Export-only, not a training quantizer: `freeze_qat` makes it from a `FakeQuant`, no
    gradient flows through the integer codes, and eagerly it multiplies by ``1 / s`` (see
    the module docstring). Only 8-bit ranges (``[0, 255]`` as uint8, ``[−128, 127]`` as int8).

    Args:
        scale: The scale.
        zero_point: The zero point.
        qmin: Smallest code (0 or −128).
        qmax: Largest code (255 or 127).
    """

    def __init__(self, scale: float, zero_point: int, *, qmin: int, qmax: int) -> None:
        super().__init__()
        if (qmin, qmax) not in _ONNX_RANGES:
            raise QuantError(f"ONNX QuantizeLinear holds uint8 [0, 255] or int8 [-128, 127] codes, not [{qmin}, {qmax}]")
        self.scale, self.zero_point, self.qmin, self.qmax = float(scale), int(zero_point), qmin, qmax
        self.axis = None
        # The exporter builds its op table when it starts: the ops must be registered before.
        _decomposed_ops()

    @property
    def bits(self) -> int:
        """Bit width of the code range (8)."""
        return (self.qmax - self.qmin).bit_length()

    def forward(self, x: Tensor) -> Tensor:
        """The fake-quantized ``x``."""
        ops = _decomposed_ops()
        dtype = _ONNX_RANGES[(self.qmin, self.qmax)]
        codes = ops.quantize_per_tensor(x, self.scale, self.zero_point, self.qmin, self.qmax, dtype)
        return ops.dequantize_per_tensor(codes, self.scale, self.zero_point, self.qmin, self.qmax, dtype)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}, zero_point={self.zero_point}, [{self.qmin}, {self.qmax}]"


def _decomposed_ops() -> Any:
    """``torch.ops.quantized_decomposed``; torch registers these ops when the module is imported."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401, PLC0415 - registration, only when exporting

    return torch.ops.quantized_decomposed


class ExportChannelFakeQuant(nn.Module):
    """Per-channel fake quantization with constant qparams, in the form ONNX export needs.

    ``torch.fake_quantize_per_channel_affine``, which the dynamo exporter writes as
    ``QuantizeLinear → DequantizeLinear`` with a per-axis scale. Export-only, not a training
    quantizer: `freeze_qat` makes it from a per-channel `FakeQuant` or `MinMaxWeightQuant`,
    and eagerly it multiplies by ``1 / s`` (see the module docstring).

    Args:
        scale: Scales, shape ``(C,)``.
        zero_point: Integer zero points, same shape.
        qmin: Smallest code.
        qmax: Largest code.
        axis: The channel axis.
    """

    scale: Tensor
    zero_point: Tensor

    def __init__(self, scale: Tensor, zero_point: Tensor, *, qmin: int, qmax: int, axis: int) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().float().reshape(-1).clone())
        self.register_buffer("zero_point", zero_point.detach().reshape(-1).to(torch.int32).clone())
        self.qmin, self.qmax, self.axis = qmin, qmax, axis

    @property
    def bits(self) -> int:
        """Bit width of the code range."""
        return (self.qmax - self.qmin).bit_length()

    def forward(self, x: Tensor) -> Tensor:
        """The fake-quantized ``x``."""
        return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.axis, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return f"[{self.qmin}, {self.qmax}], per-channel axis={self.axis}"


class MinMaxWeightQuant(nn.Module):
    """Symmetric fake quantization of a weight with its min/max scale, recomputed every call.

    ``s = max|w| / (2^(b−1) − 1)`` (per output channel, or per tensor), ``z = 0``, codes in
    ``[−2^(b−1), 2^(b−1) − 1]``, by `spiralkit.quant.affine.fake_quantize`; the scale is a
    constant for autograd (straight-through gradient to ``w`` only), as PyTorch's QAT weight
    observers do.

    Args:
        bits: Bit width.
        per_channel: One scale per output channel (axis 0).
    """

    def __init__(self, *, bits: int, per_channel: bool) -> None:
        super().__init__()
        self.qmin, self.qmax = _signed_range(bits)
        self.per_channel = per_channel
        self.spec = _range_spec(self.qmin, self.qmax, 0 if per_channel else None)

    @property
    def bits(self) -> int:
        """Bit width of the code range."""
        return self.spec.bits

    def scale_of(self, weight: Tensor) -> Tensor:
        """The current min/max scale(s) of ``weight``: shape ``(C,)`` or ``(1,)``."""
        magnitude = weight.detach().abs().float()
        amax = magnitude.reshape(weight.shape[0], -1).amax(dim=1) if self.per_channel else magnitude.max().reshape(1)
        return (amax / self.qmax).clamp(min=SCALE_FLOOR)

    def frozen(self, weight: Tensor) -> FakeQuant:
        """A `FakeQuant` with the scale ``weight`` has now (same values, exportable)."""
        scale = self.scale_of(weight)
        return FakeQuant(scale, torch.zeros_like(scale, dtype=torch.int32), qmin=self.qmin, qmax=self.qmax,
                         axis=0 if self.per_channel else None)

    def forward(self, weight: Tensor) -> Tensor:
        """The fake-quantized weight."""
        scale = self.scale_of(weight)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
        return fake_quantize(weight, scale, zero_point, self.spec, reject_nonfinite=False)

    def extra_repr(self) -> str:
        return f"[{self.qmin}, {self.qmax}], {'per-channel' if self.per_channel else 'per-tensor'} min/max"


ActivationQuant = FakeQuant | ExportFakeQuant
WeightQuant = FakeQuant | ExportFakeQuant | ExportChannelFakeQuant | MinMaxWeightQuant


# --------------------------------------------------------------------------- layers


def _bias_on_grid(bias: Tensor, step: Tensor) -> Tensor:
    """``round(b / step) · step`` with a straight-through gradient to ``b`` (none to ``step``)."""
    step = step.detach().reshape(-1).clamp(min=SCALE_FLOOR)
    return bias + (torch.round(bias.detach() / step) * step - bias.detach())


@singledispatch
def _scale(quant: nn.Module, tensor: Tensor) -> Tensor:
    """The scale(s) ``quant`` applies to ``tensor`` now."""
    raise QuantError(f"unknown quantizer {type(quant).__name__}")


@_scale.register(FakeQuant)
@_scale.register(ExportChannelFakeQuant)
def _(quant: FakeQuant | ExportChannelFakeQuant, tensor: Tensor) -> Tensor:
    return quant.scale


@_scale.register
def _(quant: ExportFakeQuant, tensor: Tensor) -> Tensor:
    return torch.tensor([quant.scale])


@_scale.register
def _(quant: MinMaxWeightQuant, tensor: Tensor) -> Tensor:
    return quant.scale_of(tensor)


class _QATLayer(nn.Module):
    """Float weight and bias, a weight quantizer, optional input/output quantizers.

    The weight and bias keep the float layer's parameter names, so ``"fc1.weight"`` is the
    same key in the state dict and the same initializer name in an ONNX export.

    When the input is quantized, the bias is put on the grid of the integer kernel's int32
    accumulator, ``b̂ = round(b / (s_x·s_w)) · s_x·s_w`` per output channel (Jacob et al.
    2018, §2.4), as ONNX Runtime does when it fuses the layer: a float bias would make the
    fake-quantized model round differently from the integer one wherever an output sits near
    a rounding boundary — for a constant background patch, that is every such position.
    """

    def __init__(
        self,
        layer: nn.Linear | nn.Conv2d,
        *,
        weight_quant: WeightQuant,
        input_quant: ActivationQuant | None,
        output_quant: ActivationQuant | None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(),
                                                                 requires_grad=layer.bias.requires_grad)
        self.weight_quant = weight_quant
        self.input_quant = input_quant
        self.output_quant = output_quant
        # Off only in `freeze_qat`'s copy, whose bias is already on the grid.
        self.quantize_bias = input_quant is not None

    def _op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def effective_bias(self) -> Tensor | None:
        """The bias the layer adds: on the int32 accumulator grid when the input is quantized."""
        if self.bias is None or not self.quantize_bias or self.input_quant is None:
            return self.bias
        step = _scale(self.input_quant, self.weight) * _scale(self.weight_quant, self.weight)
        return _bias_on_grid(self.bias, step)

    def forward(self, x: Tensor) -> Tensor:
        """``Q_out(op(Q_in(x), Q_w(W)) + b̂)`` with the quantizers that are present."""
        if self.input_quant is not None:
            x = self.input_quant(x)
        y = self._op(x, self.weight_quant(self.weight), self.effective_bias())
        return y if self.output_quant is None else self.output_quant(y)


class QATLinear(_QATLayer):
    """``nn.Linear`` computing with fake-quantized weights (and activations); see the module docstring."""

    def __init__(self, linear: nn.Linear, *, weight_quant: WeightQuant, input_quant: ActivationQuant | None = None,
                 output_quant: ActivationQuant | None = None) -> None:
        super().__init__(linear, weight_quant=weight_quant, input_quant=input_quant, output_quant=output_quant)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def _op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QATConv2d(_QATLayer):
    """``nn.Conv2d`` (zero padding) computing with fake-quantized weights (and activations)."""

    def __init__(self, conv: nn.Conv2d, *, weight_quant: WeightQuant, input_quant: ActivationQuant | None = None,
                 output_quant: ActivationQuant | None = None) -> None:
        super().__init__(conv, weight_quant=weight_quant, input_quant=input_quant, output_quant=output_quant)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def _op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.weight.shape[2:])}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}, bias={self.bias is not None}")


# --------------------------------------------------------------------------- prepare


def _layers(model: nn.Module, keep_float: Sequence[str]) -> dict[str, nn.Linear | nn.Conv2d]:
    """The Conv2d/Linear layers to wrap, by name.

    Raises:
        QuantError: No such layer, a ``keep_float`` pattern matching none, or a Conv2d with
            non-zero padding mode.
    """
    layers = {name: m for name, m in model.named_modules() if name and isinstance(m, (nn.Linear, nn.Conv2d))}
    if not layers:
        raise QuantError(f"{type(model).__name__} has no nn.Conv2d or nn.Linear submodule to quantize")
    if (pattern := first_unmatched(keep_float, layers)) is not None:
        raise QuantError(
            f"keep_float pattern {pattern!r} matches no Conv2d/Linear layer; layers are: {', '.join(layers)}"
        )
    chosen = {name: m for name, m in layers.items() if not matches_any(name, keep_float)}
    for name, layer in chosen.items():
        if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
            raise QuantError(f"layer {name!r}: QAT supports Conv2d with padding_mode='zeros', got "
                             f"{layer.padding_mode!r}; keep it in float with keep_float")
    return chosen


def _input_of(batch: object) -> Tensor:
    x = batch if isinstance(batch, Tensor) else batch[0] if isinstance(batch, (tuple, list)) and batch else None
    if not isinstance(x, Tensor):
        raise QuantError(f"calibration batches must be (x, y) pairs or tensors, got {type(batch).__name__}")
    return x


@contextmanager
def _observing(layers: dict[str, nn.Module], observers: dict[str, tuple[Observer, Observer]]) -> Iterator[None]:
    """Feed every layer's input and output to its observers while the context is open."""

    def hook(name: str):  # noqa: ANN202 - a forward hook
        def observe(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            observers[name][0].update(inputs[0])
            observers[name][1].update(output)
        return observe

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _calibrate(
    model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[object]
) -> dict[str, tuple[Observer, Observer]]:
    """Min/max observers of each layer's input and output over ``batches`` (float model, eval mode)."""
    observers = {name: (Observer(MinMax(), name=f"{name} input"), Observer(MinMax(), name=f"{name} output"))
                 for name in layers}
    count = 0
    was_training = model.training
    model.eval()
    try:
        with _observing(layers, observers), torch.no_grad():
            for batch in batches:
                model(_input_of(batch))
                count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise QuantError("QAT needs calibration data for the activation ranges, but no calibration batches came")
    for name, (seen_in, _) in observers.items():
        if not seen_in.observed:
            raise QuantError(f"layer {name!r} never ran on the calibration batches; keep it in float with keep_float")
    return observers


def _activation_quant(observer: Observer, *, bits: int, learn: bool) -> FakeQuant:
    """Unsigned affine per-tensor quantizer over ``[0, 2^b − 1]`` from observed min/max."""
    spec = QuantSpec(bits=bits, symmetric=False, signed=False, granularity=PerTensor())
    scale, zero_point = observer.qparams(spec)
    cls = LearnedFakeQuant if learn else FakeQuant
    return cls(scale, zero_point, qmin=spec.qmin, qmax=spec.qmax, axis=None)


def _weight_quant(weight: Tensor, config: QATConfig) -> WeightQuant:
    minmax = MinMaxWeightQuant(bits=config.weight_bits, per_channel=config.per_channel)
    if not config.learn_scales:
        return minmax
    frozen = minmax.frozen(weight)
    return LearnedFakeQuant(frozen.scale, frozen.zero_point, qmin=frozen.qmin, qmax=frozen.qmax, axis=frozen.axis)


def prepare_qat(
    model: nn.Module, config: QATConfig, *, calibration_batches: Iterable[Tensor | tuple[Tensor, Tensor]]
) -> nn.Module:
    """QAT's prepare step: a copy of ``model`` with its Conv2d/Linear layers swapped for fake-quantized ones.

    Weight scales start at min/max (symmetric, per channel by default); activation ranges
    (each wrapped layer's input and output) come from a min/max observer run on the float
    model over ``calibration_batches``. ``model`` is not modified.

    Args:
        model: The float model.
        config: Bits, granularity, LSQ, activations, layers kept in float.
        calibration_batches: ``(x, y)`` batches or input tensors; all are used. Ignored
            (may be empty) when ``config.quantize_activations`` is off.

    Returns:
        The fake-quantized model (`QATConv2d` / `QATLinear` in place of the layers), in
        the mode ``model`` was in.

    Raises:
        QuantError: No layer to quantize, a ``keep_float`` pattern matching no layer, a
            Conv2d with non-zero padding, no calibration batch, or a layer that never ran.
    """
    student = copy.deepcopy(model)
    layers = _layers(student, config.keep_float)
    observers = _calibrate(student, layers, calibration_batches) if config.quantize_activations else {}
    replacements: dict[int, nn.Module] = {}
    for name, layer in layers.items():
        quantizers: dict[str, FakeQuant | None] = {"input_quant": None, "output_quant": None}
        if name in observers:
            seen_in, seen_out = observers[name]
            quantizers = {
                "input_quant": _activation_quant(seen_in, bits=config.act_bits, learn=config.learn_scales),
                "output_quant": _activation_quant(seen_out, bits=config.act_bits, learn=config.learn_scales),
            }
        cls = QATLinear if isinstance(layer, nn.Linear) else QATConv2d
        wrapped = cls(layer, weight_quant=_weight_quant(layer.weight, config), **quantizers)  # type: ignore[arg-type]
        replacements[id(layer)] = wrapped.train(layer.training)
    _swap(student, replacements)
    return student


# --------------------------------------------------------------------------- export


@singledispatch
def _frozen_weight_quant(quant: nn.Module, weight: Tensor) -> nn.Module:
    raise QuantError(f"unknown weight quantizer {type(quant).__name__}")


@_frozen_weight_quant.register
def _(quant: MinMaxWeightQuant, weight: Tensor) -> nn.Module:
    return quant.frozen(weight)


@_frozen_weight_quant.register
def _(quant: FakeQuant, weight: Tensor) -> nn.Module:
    return quant


@_frozen_weight_quant.register(ExportFakeQuant)
@_frozen_weight_quant.register(ExportChannelFakeQuant)
def _(quant: ExportFakeQuant | ExportChannelFakeQuant, weight: Tensor) -> nn.Module:
    return quant


def _frozen(quant: FakeQuant | ExportFakeQuant | ExportChannelFakeQuant | None) -> nn.Module | None:
    """The export form of ``quant``: `ExportFakeQuant` per tensor, `ExportChannelFakeQuant` per channel.

    A `LearnedFakeQuant` loses its parameter (the learned value is kept).
    """
    if quant is None or isinstance(quant, (ExportFakeQuant, ExportChannelFakeQuant)):
        return quant
    if quant.axis is None:
        return ExportFakeQuant(float(quant.scale.detach()), int(quant.zero_point), qmin=quant.qmin, qmax=quant.qmax)
    return ExportChannelFakeQuant(quant.scale, quant.zero_point, qmin=quant.qmin, qmax=quant.qmax, axis=quant.axis)


def _in_int8(layer: _QATLayer, quant: FakeQuant) -> FakeQuant:
    """A reduced-range weight quantizer as int8 ONNX holds it: ``layer``'s weight clamped to its codes' range.

    ``round(clamp(w, −64·s, 63·s) / s)`` gives the 7-bit codes, so the int8 quantizer that
    replaces ``quant`` (same scale, ``[−128, 127]``) computes the same values, and
    ``QuantizeLinear`` writes them into int8 initializers.
    """
    scale = quant.scale.detach().reshape(-1, *([1] * (layer.weight.dim() - 1))) if quant.axis is not None else quant.scale
    low, high = quant.qmin * scale, quant.qmax * scale
    layer.weight = nn.Parameter(torch.minimum(torch.maximum(layer.weight.detach(), low), high), requires_grad=False)
    qmin, qmax = _signed_range(EXPORT_BITS)
    return FakeQuant(quant.scale.detach(), quant.zero_point, qmin=qmin, qmax=qmax, axis=quant.axis)


def freeze_qat(model: nn.Module) -> nn.Module:
    """An export-ready copy of an 8-bit QAT model: every quantizer with constant qparams.

    QAT's convert step. The copy computes the values of ``model`` in eval mode (min/max
    weight scales are taken from the current weights, LSQ scales are copied; up to the
    ``1 / s`` rounding noted in the module docstring), but only with ops torch's dynamo ONNX
    exporter turns into ``QuantizeLinear → DequantizeLinear``; nothing in it is trained any more.

    A reduced-range model's 7-bit weight quantizers become int8 ones over weights clamped to
    the 7-bit codes' range (the same values; `_in_int8`).

    Raises:
        QuantError: A per-tensor quantizer is not 8-bit.
    """
    frozen = copy.deepcopy(model)
    for module in frozen.modules():
        if isinstance(module, _QATLayer):
            bias = module.effective_bias()
            if bias is not None:
                module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
            module.quantize_bias = False
            weight_quant = _frozen_weight_quant(module.weight_quant, module.weight)
            if isinstance(weight_quant, FakeQuant) and (weight_quant.qmin, weight_quant.qmax) == _signed_range(EXPORT_BITS - 1):
                weight_quant = _in_int8(module, weight_quant)
            module.weight_quant = _frozen(weight_quant)
            module.input_quant = _frozen(module.input_quant)
            module.output_quant = _frozen(module.output_quant)
    return frozen


def _check_exportable(model: nn.Module) -> None:
    """Every quantizer must be 8-bit and every wrapped layer must quantize its activations."""
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, _QATLayer)]
    if not wrapped:
        raise QuantError(f"{type(model).__name__} has no QAT layer; prepare it with prepare_qat")
    for name, layer in wrapped:
        if layer.weight_quant.bits not in (EXPORT_BITS, EXPORT_BITS - 1):
            raise QuantError(
                f"layer {name!r} has {layer.weight_quant.bits}-bit weights; only 8-bit QAT models (or 7-bit weights, "
                "reduce_range) export to ONNX (QuantizeLinear is int8/uint8). Evaluate lower bit widths in PyTorch"
            )
        for quant in (layer.input_quant, layer.output_quant):
            if quant is not None and quant.bits != EXPORT_BITS:
                raise QuantError(
                    f"layer {name!r} has {quant.bits}-bit activations; only 8-bit QAT models export to ONNX"
                )


def export_qat_onnx(qat_model: nn.Module, example: Tensor, path: Path) -> Path:
    """QAT's convert step: an 8-bit QAT model as an ONNX QDQ file that ONNX Runtime runs on integer kernels.

    The model is frozen (`freeze_qat`) and exported by `spiralkit.export.onnx.export_onnx`
    (torch's dynamo exporter, one self-contained file, dynamic batch). Every fake quantizer
    becomes a ``QuantizeLinear → DequantizeLinear`` pair carrying the trained scale (uint8
    activations, int8 per-channel weights); ONNX Runtime folds the weight ``QuantizeLinear``
    into int8 initializers and fuses ``DequantizeLinear → Conv/Gemm → QuantizeLinear`` into
    ``QLinearConv`` / ``QGemm`` when it loads the file (see
    `spiralkit.quant.ort.integer_ops`). Layers kept in float, or trained without activation
    quantization, stay float ops.

    Args:
        qat_model: A model from `prepare_qat`, trained or not (not modified).
        example: An example input batch.
        path: The ``.onnx`` file to write.

    Returns:
        ``path``.

    Raises:
        QuantError: The model has no QAT layer, or a quantizer is not 8-bit (the message
            names the layer).
        spiralkit.export.onnx.ExportError: The exporter fails.
    """
    _check_exportable(qat_model)
    return export_onnx(freeze_qat(qat_model), example, Path(path))
