"""Uniform affine quantization to b bits (2–8): the maths every other quantizer builds on.

A real value ``x`` is mapped to an integer code ``q`` with a scale ``s > 0`` and an integer
zero point ``z`` (Jacob et al. 2018, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference")::

    q = clamp(round(x / s) + z, qmin, qmax)        x̂ = (q − z) · s

``round`` is round-half-to-even (``torch.round``). The code range depends on the spec:

=====================  ==========================  ===========================
spec                   range ``[qmin, qmax]``      zero point
=====================  ==========================  ===========================
signed, asymmetric     ``[−2^(b−1), 2^(b−1) − 1]``  ``qmin − round(lo / s)``
signed, symmetric      ``[−(2^(b−1) − 1), 2^(b−1) − 1]`` (restricted) ``0``
unsigned, asymmetric   ``[0, 2^b − 1]``             ``qmin − round(lo / s)``
unsigned, symmetric    ``[0, 2^b − 1]``             ``0`` (for non-negative tensors)
=====================  ==========================  ===========================

Symmetric signed quantization uses the *restricted* range (int8: ``[−127, 127]``) so that
the grid is symmetric about zero and ``−x`` quantizes to ``−q``; this costs one code
(the choice of TensorRT and of PyTorch's per-channel weight observers with
``quant_min=-127``). Symmetric unsigned quantization has ``z = 0`` over ``[0, 2^b − 1]``:
it suits tensors that are never negative (after a ReLU); negative values clamp to zero.

The range ``[lo, hi]`` always includes zero (``lo ← min(lo, 0)``, ``hi ← max(hi, 0)``),
so zero — padding, pruned weights, ReLU outputs — is represented exactly. The scale is
floored at the smallest normal float32 (≈ 1.2e−38): an all-zero tensor or channel (or a
constant zero) gets a positive scale and round-trips to exactly zero; a constant non-zero
tensor ``c`` lands on the end of the grid and comes back as ``(qmax − z)·s``, equal to ``c``
up to float32 rounding of ``s`` (within ``s/2`` like every in-range value).

Granularity is an object, as in torchao: `PerTensor` (one ``s, z``), `PerChannel` (one per
index along ``axis``; scale shape ``(C,)``) or `PerGroup` (contiguous groups of ``size``
elements along the last axis; scale shape ``(*x.shape[:-1], ceil(n / size))``, the last
group may be shorter).

All arithmetic is in float32 (inputs of other float dtypes are converted), so the
quantize→dequantize round trip is exact and reproducible: ``quantize(dequantize(q)) == q``
for every code, and ``|x − x̂| ≤ s/2`` for every ``x`` inside the range.

Training through the rounding uses the straight-through estimator (`fake_quantize`,
Bengio et al. 2013) or LSQ's learned step size (`lsq_fake_quantize`, Esser et al. 2020).
The two share one implementation, spiralkit's only fake-quantizer: the QAT modules
(`spiralkit.quant.qat`) and Deep Compression's trained quantization
(`spiralkit.quant.nonzero.fake_quantize_nonzero`) call them.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from torch import Tensor

from spiralkit.configs import kind_from_string
from spiralkit.errors import SpiralError

__all__ = [
    "Granularity",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "QuantError",
    "QuantSpec",
    "check_bits",
    "check_finite",
    "choose_qparams",
    "dequantize",
    "expand_qparam",
    "fake_quantize",
    "lsq_fake_quantize",
    "qparam_shape",
    "qparams_from_range",
    "quantize",
    "tensor_range",
]

MIN_BITS = 2
MAX_BITS = 8
MIN_SCALE = torch.finfo(torch.float32).tiny
"""Smallest scale ever used: a zero range would otherwise give ``s = 0`` and ``x / 0``."""


class QuantError(SpiralError):
    """A quantization request cannot be carried out (bad bits, NaN input, no calibration data)."""


# --------------------------------------------------------------------------- configs


class PerTensor(BaseModel):
    """One scale and zero point for the whole tensor."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["per-tensor"] = "per-tensor"


class PerChannel(BaseModel):
    """One scale and zero point per index along ``axis`` (0: output channels of a weight)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["per-channel"] = "per-channel"
    axis: int = 0


class PerGroup(BaseModel):
    """One scale and zero point per ``size`` contiguous elements along the last axis.

    For a ``Linear`` weight ``(out, in)`` the groups run along the input dimension. When
    ``size`` does not divide the last axis the last group of each row is shorter.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["per-group"] = "per-group"
    size: int = Field(gt=0)


Granularity = Annotated[
    PerTensor | PerChannel | PerGroup, Field(discriminator="kind"), BeforeValidator(kind_from_string)
]


class QuantSpec(BaseModel):
    """How a tensor is quantized: bit width, symmetry, granularity, signedness.

    Attributes:
        bits: Bit width ``b`` of the codes, 2..8.
        symmetric: ``z = 0`` and a grid symmetric about zero (see the module docstring).
        granularity: `PerTensor`, `PerChannel` or `PerGroup`.
        signed: Codes are ``int8`` in a signed range; otherwise ``uint8`` in ``[0, 2^b − 1]``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    bits: int = 8
    symmetric: bool = False
    granularity: Granularity = PerTensor()
    signed: bool = True

    @field_validator("bits")
    @classmethod
    def _bits_in_range(cls, bits: int) -> int:
        problem = _bits_problem(bits)
        if problem:
            raise ValueError(problem)
        return bits

    @property
    def qmin(self) -> int:
        """Smallest code."""
        if not self.signed:
            return 0
        half = 1 << (self.bits - 1)
        return -(half - 1) if self.symmetric else -half

    @property
    def qmax(self) -> int:
        """Largest code."""
        return (1 << self.bits) - 1 if not self.signed else (1 << (self.bits - 1)) - 1

    @property
    def code_dtype(self) -> torch.dtype:
        """``torch.int8`` for signed codes, ``torch.uint8`` for unsigned ones."""
        return torch.int8 if self.signed else torch.uint8


def _bits_problem(bits: object) -> str | None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        return f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}"
    return None


def check_bits(bits: object) -> int:
    """Return ``bits`` if it is an integer in 2..8.

    Raises:
        QuantError: Naming the bad value.
    """
    problem = _bits_problem(bits)
    if problem:
        raise QuantError(problem)
    return bits  # type: ignore[return-value]


def check_finite(x: Tensor, name: str | None = None) -> None:
    """Raise if ``x`` holds NaN or infinite values.

    Args:
        x: Any floating-point tensor.
        name: What ``x`` is (``"fc1.weight"``), for the message.

    Raises:
        QuantError: Naming the tensor and how many values are not finite.
    """
    if not x.is_floating_point():
        return
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise QuantError(
            f"cannot quantize {_label(name)}: {bad} of {x.numel()} values are NaN or infinite"
        )


def _label(name: str | None) -> str:
    return f"tensor {name!r}" if name else "tensor"


# --------------------------------------------------------------------------- shapes


def _channel_axis(granularity: PerChannel, ndim: int, name: str | None) -> int:
    axis = granularity.axis + ndim if granularity.axis < 0 else granularity.axis
    if not 0 <= axis < ndim:
        raise QuantError(f"per-channel axis {granularity.axis} is out of range for {_label(name)} with {ndim} dims")
    return axis


def _grouped(x: Tensor, size: int, name: str | None, *, fill: float) -> Tensor:
    """``x`` as ``(*x.shape[:-1], groups, size)``, the last group padded with ``fill``."""
    if x.dim() == 0:
        raise QuantError(f"per-group quantization needs at least one dimension; {_label(name)} is a scalar")
    n = x.shape[-1]
    groups = max(math.ceil(n / size), 1)
    pad = groups * size - n
    if pad:
        x = torch.cat([x, x.new_full((*x.shape[:-1], pad), fill)], dim=-1)
    return x.reshape(*x.shape[:-1], groups, size)


def qparam_shape(shape: torch.Size | tuple[int, ...], granularity: Granularity) -> tuple[int, ...]:
    """Shape of the scale and zero point for a tensor of ``shape``."""
    match granularity:
        case PerTensor():
            return ()
        case PerChannel():
            return (shape[_channel_axis(granularity, len(shape), None)],)
        case PerGroup(size=size):
            if not shape:
                raise QuantError("per-group quantization needs at least one dimension")
            return (*shape[:-1], max(math.ceil(shape[-1] / size), 1))
    raise QuantError(f"unknown granularity {granularity!r}")


def tensor_range(x: Tensor, granularity: Granularity, *, name: str | None = None) -> tuple[Tensor, Tensor]:
    """Minimum and maximum of ``x`` per scale entry (float32, shape `qparam_shape`).

    Args:
        x: The tensor.
        granularity: Which elements share a scale.
        name: What ``x`` is, for error messages.

    Returns:
        ``(lo, hi)``.
    """
    check_finite(x, name)
    x = x.detach().float()
    if x.numel() == 0:
        zeros = torch.zeros(qparam_shape(x.shape, granularity))
        return zeros, zeros.clone()
    match granularity:
        case PerTensor():
            return x.min(), x.max()
        case PerChannel():
            axis = _channel_axis(granularity, x.dim(), name)
            rows = x.movedim(axis, 0).reshape(x.shape[axis], -1)
            return rows.amin(dim=1), rows.amax(dim=1)
        case PerGroup(size=size):
            # Zero padding cannot change the range: zero is always included anyway.
            grouped = _grouped(x, size, name, fill=0.0)
            return grouped.amin(dim=-1), grouped.amax(dim=-1)
    raise QuantError(f"unknown granularity {granularity!r}")


def expand_qparam(param: Tensor, shape: torch.Size | tuple[int, ...], granularity: Granularity) -> Tensor:
    """Broadcast a scale or zero point of shape `qparam_shape` to ``shape`` (or broadcastable).

    Raises:
        QuantError: ``param`` has the wrong shape for the granularity.
    """
    expected = qparam_shape(shape, granularity)
    if tuple(param.shape) != expected and not (expected == () and param.numel() == 1):
        raise QuantError(
            f"{granularity.kind} quantization of a {tuple(shape)} tensor needs scale/zero-point "
            f"shape {expected}, got {tuple(param.shape)}"
        )
    match granularity:
        case PerTensor():
            return param.reshape(())
        case PerChannel():
            axis = _channel_axis(granularity, len(shape), None)
            view = [1] * len(shape)
            view[axis] = shape[axis]
            return param.reshape(view)
        case PerGroup(size=size):
            return param.repeat_interleave(size, dim=-1)[..., : shape[-1]]
    raise QuantError(f"unknown granularity {granularity!r}")


# --------------------------------------------------------------------------- qparams


def qparams_from_range(
    lo: Tensor | float, hi: Tensor | float, spec: QuantSpec, *, name: str | None = None
) -> tuple[Tensor, Tensor]:
    """Scale and zero point that map ``[lo, hi]`` (widened to include 0) onto the code range.

    Asymmetric: ``s = (hi − lo) / (qmax − qmin)``, ``z = qmin − round(lo / s)``.
    Symmetric signed: ``s = max(−lo, hi) / qmax``, ``z = 0``.
    Symmetric unsigned: ``s = hi / qmax``, ``z = 0``.
    Then ``s ← max(s, 1.2e−38)`` so that a zero range still has a usable scale.

    Args:
        lo: Minimum per scale entry (a float or a tensor).
        hi: Maximum per scale entry, same shape as ``lo``.
        spec: The quantization spec.
        name: What is being quantized, for error messages.

    Returns:
        ``(scale, zero_point)``: float32 and int32 tensors of ``lo``'s shape.

    Raises:
        QuantError: ``lo`` or ``hi`` is NaN or infinite, or ``lo > hi``.
    """
    lo_t = torch.as_tensor(lo, dtype=torch.float32).detach()
    hi_t = torch.as_tensor(hi, dtype=torch.float32).detach()
    check_finite(lo_t, name and f"{name} (range minimum)")
    check_finite(hi_t, name and f"{name} (range maximum)")
    if bool((lo_t > hi_t).any()):
        raise QuantError(f"empty range for {_label(name)}: minimum > maximum")
    lo_t = lo_t.clamp(max=0.0)
    hi_t = hi_t.clamp(min=0.0)
    if spec.symmetric:
        amax = torch.maximum(-lo_t, hi_t) if spec.signed else hi_t
        scale = (amax / spec.qmax).clamp(min=MIN_SCALE)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = ((hi_t - lo_t) / (spec.qmax - spec.qmin)).clamp(min=MIN_SCALE)
    zero_point = (spec.qmin - torch.round(lo_t / scale)).clamp(spec.qmin, spec.qmax)
    return scale, zero_point.to(torch.int32)


def choose_qparams(x: Tensor, spec: QuantSpec, *, name: str | None = None) -> tuple[Tensor, Tensor]:
    """Min/max scale and zero point for ``x`` at ``spec``'s granularity.

    Shorthand for ``qparams_from_range(*tensor_range(x, spec.granularity), spec)``.
    """
    lo, hi = tensor_range(x, spec.granularity, name=name)
    return qparams_from_range(lo, hi, spec, name=name)


# --------------------------------------------------------------------------- quantize


def _expanded(x: Tensor, scale: Tensor, zero_point: Tensor, granularity: Granularity) -> tuple[Tensor, Tensor]:
    s = expand_qparam(torch.as_tensor(scale).float(), x.shape, granularity)
    z = expand_qparam(torch.as_tensor(zero_point).float(), x.shape, granularity)
    return s, z


def quantize(
    x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec, *, name: str | None = None
) -> Tensor:
    """Integer codes ``q = clamp(round(x / s) + z, qmin, qmax)``.

    Args:
        x: Float tensor.
        scale: Float scale(s), shape `qparam_shape` for ``spec.granularity``.
        zero_point: Integer zero point(s), same shape.
        spec: The quantization spec.
        name: What ``x`` is, for error messages.

    Returns:
        Codes of ``x``'s shape, ``int8`` (signed spec) or ``uint8`` (unsigned).

    Raises:
        QuantError: ``x`` holds NaN or infinite values, or the qparams have the wrong shape.
    """
    check_finite(x, name)
    s, z = _expanded(x, scale, zero_point, spec.granularity)
    q = torch.clamp(torch.round(x.detach().float() / s) + z, spec.qmin, spec.qmax)
    return q.to(spec.code_dtype)


def dequantize(
    q: Tensor, scale: Tensor, zero_point: Tensor, *, granularity: Granularity = PerTensor()
) -> Tensor:
    """Float values ``x̂ = (q − z) · s`` (float32).

    Args:
        q: Integer codes.
        scale: Float scale(s), shape `qparam_shape` for ``granularity``.
        zero_point: Integer zero point(s), same shape.
        granularity: The granularity ``q`` was quantized with.

    Returns:
        A float32 tensor of ``q``'s shape.
    """
    s, z = _expanded(q, scale, zero_point, granularity)
    return (q.float() - z) * s


def _fake_quantized(x: Tensor, s: Tensor, z: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fake-quantized value of ``x`` (no gradient), its in-range mask, ``v = x / s`` and ``round(v) + z``.

    ``s`` and ``z`` are already broadcast to ``x`` (`expand_qparam`) and carry no gradient.
    """
    v = x.detach().float() / s
    unclamped = torch.round(v) + z
    inside = (unclamped >= spec.qmin) & (unclamped <= spec.qmax)
    return (torch.clamp(unclamped, spec.qmin, spec.qmax) - z) * s, inside, v, unclamped


def fake_quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    spec: QuantSpec,
    *,
    name: str | None = None,
    reject_nonfinite: bool = True,
) -> Tensor:
    """Quantize then dequantize, with a straight-through gradient (Bengio et al. 2013).

    The one fake-quantizer of spiralkit: the QAT modules (`spiralkit.quant.qat`) and Deep
    Compression's trained quantization (`spiralkit.quant.nonzero.fake_quantize_nonzero`)
    call it, and `lsq_fake_quantize` shares its value. The value is exactly
    ``dequantize(quantize(x))``: ``x / s`` is a true division, as in ONNX's
    ``QuantizeLinear`` (torch's ``fake_quantize_*`` kernels multiply by ``1 / s`` instead,
    which can round the other way when ``x / s`` is within float rounding of a half-integer).
    The gradient with respect to ``x`` is the clipped straight-through estimator used by
    PyTorch's ``fake_quantize_*``:

    ``∂x̂/∂x = 1`` where ``qmin ≤ round(x/s) + z ≤ qmax`` and ``0`` where the value is
    clamped. ``scale`` and ``zero_point`` get no gradient (see `lsq_fake_quantize`).

    Args:
        x: Float tensor (may require grad).
        scale: Scale(s), shape `qparam_shape`.
        zero_point: Zero point(s), same shape.
        spec: The quantization spec.
        name: What ``x`` is, for error messages.
        reject_nonfinite: Raise on NaN/inf in ``x``. Training quantizers turn it off: a
            non-finite activation there surfaces as a non-finite loss, which the training
            loop reports.

    Returns:
        A float32 tensor of ``x``'s shape.
    """
    if reject_nonfinite:
        check_finite(x, name)
    s, z = _expanded(x, scale.detach(), zero_point.detach(), spec.granularity)
    value, inside, _, _ = _fake_quantized(x, s, z, spec)
    x32 = x.float()
    # value + 0·(…): the forward result is the quantized value; the backward pass sees
    # ∂/∂x = 1 inside the range and 0 outside.
    return value + (x32 - x32.detach()) * inside


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient multiplied by ``g`` backward (LSQ's gradient scaling)."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, g: float) -> Tensor:
        ctx.g = g
        return value.view_as(value)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.g, None


def lsq_fake_quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    spec: QuantSpec,
    *,
    grad_scale: float | None = None,
    name: str | None = None,
    reject_nonfinite: bool = True,
) -> Tensor:
    """Fake quantization with a learnable step size: LSQ (Esser et al. 2020, "Learned Step
    Size Quantization").

    The value is exactly that of `fake_quantize`, ``dequantize(quantize(x))``. Gradients,
    with ``v = x / s``:

    * ``∂x̂/∂x = 1`` inside the range (``qmin ≤ round(v) + z ≤ qmax``), ``0`` where clamped
      (straight-through estimator);
    * ``∂x̂/∂s = round(v) − v`` inside, ``qmin − z`` below, ``qmax − z`` above,
      then multiplied by ``g = 1 / sqrt(N · qmax)`` where ``N`` is the number of elements
      sharing one scale (``x.numel()`` per tensor, ``x.numel() / C`` per channel) — the
      paper's gradient scaling, which keeps the step size's updates on the scale of the
      weights' updates. With ``z = 0`` and ``qmin = −Q_N``, ``qmax = Q_P`` this is the
      paper's Eq. 3, and the gradient of torch's ``_fake_quantize_learnable_*`` kernels.

    The zero point gets no gradient.

    Args:
        x: Float tensor.
        scale: Scale(s), shape `qparam_shape`; usually an ``nn.Parameter``.
        zero_point: Zero point(s), same shape.
        spec: The quantization spec.
        grad_scale: Override ``g``.
        name: What ``x`` is, for error messages.
        reject_nonfinite: Raise on NaN/inf in ``x`` (see `fake_quantize`).

    Returns:
        A float32 tensor of ``x``'s shape.
    """
    if reject_nonfinite:
        check_finite(x, name)
    if grad_scale is None:
        per_scale = max(x.numel() // max(scale.numel(), 1), 1)
        grad_scale = 1.0 / math.sqrt(per_scale * spec.qmax)
    s = expand_qparam(_ScaleGrad.apply(scale.float(), grad_scale), x.shape, spec.granularity)
    z = expand_qparam(torch.as_tensor(zero_point).detach().float(), x.shape, spec.granularity)
    value, inside, v, unclamped = _fake_quantized(x, s.detach(), z, spec)
    slope = torch.where(inside, torch.round(v) - v, torch.where(unclamped < spec.qmin, spec.qmin - z, spec.qmax - z))
    x32 = x.float()
    # Both added terms are 0 forward; backward they give ∂/∂x = inside and ∂/∂s = slope.
    return value + (x32 - x32.detach()) * inside + (s - s.detach()) * slope
