"""Deep Compression's weight quantizer: the non-zero weights on a b-bit uniform grid, zeros kept.

Han et al. 2016, "Deep Compression: Compressing Deep Neural Networks with Pruning, Trained
Quantization and Huffman Coding". Zeros are never quantized: pruned weights stay exactly
``+0.0``. The quantizer is symmetric and uniform, per tensor (or per output channel), over
the restricted signed range ``[−Q, Q]``, ``Q = 2^(b−1) − 1``::

    s = bfloat16(max|w| / Q)        q = clamp(round(w / s), −Q, Q)        ŵ = q · s

i.e. `QuantSpec` ``(bits=b, symmetric=True)`` with its min/max scale rounded to bfloat16
(stored in 2 bytes by the compact artefact, `spiralkit.quant.compact`; no zero point, since
it is 0). Two reasons for this choice: a symmetric grid loses at most one of the ``2^b``
levels on weights, which are near-symmetric about zero; and the quantizer is then exactly
*idempotent*: the largest ``|w|`` always gets code ``±Q`` (the bfloat16 rounding moves ``s``
by at most ``2^−9``, so ``max|w| / s`` stays within ``Q ± 0.25``), and ``q · s`` is exact in
float32 (8-bit × 8-bit significands), so quantizing ``ŵ`` again finds the same ``s`` and the
same codes. Hence `quantize_nonzero_` (the in-memory version, for evaluating the accuracy of
exactly the weights that get saved) can be applied before `save_compressed` without changing
what is saved. An asymmetric min/max quantizer is not idempotent: its re-derived range can
lose the top code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from spiralkit.patterns import first_unmatched, matches_any
from spiralkit.quant.affine import (
    PerChannel,
    PerTensor,
    QuantError,
    QuantSpec,
    check_bits,
    choose_qparams,
    dequantize,
    fake_quantize,
    quantize,
)

__all__ = [
    "BitsArg",
    "NonzeroGranularity",
    "check_granularity",
    "fake_quantize_nonzero",
    "nonzero_spec",
    "quantize_nonzero_",
    "weight_bits",
    "weight_codes",
    "weight_values",
]

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""The layers whose weights the quantizer handles."""

BitsArg = Mapping[str, int] | int | None
NonzeroGranularity = PerTensor | PerChannel


def nonzero_spec(bits: int, granularity: NonzeroGranularity) -> QuantSpec:
    """The `QuantSpec` of the quantizer: ``bits``, symmetric, signed (restricted range ``[−Q, Q]``)."""
    return QuantSpec(bits=bits, symmetric=True, signed=True, granularity=granularity)


def check_granularity(granularity: object) -> NonzeroGranularity:
    """Return ``granularity`` if it is `PerTensor` or `PerChannel` along axis 0.

    Raises:
        QuantError: Any other granularity.
    """
    if isinstance(granularity, PerTensor) or (isinstance(granularity, PerChannel) and granularity.axis == 0):
        return granularity
    raise QuantError(f"the compact format quantizes per tensor or per output channel (axis 0), got {granularity!r}")


def weight_bits(model: nn.Module, bits: BitsArg, exclude: Sequence[str]) -> dict[str, int | None]:
    """Bits (or ``None``: kept in float) per Linear/Conv weight name, e.g. ``"fc1.weight"``.

    Raises:
        QuantError: An exclude pattern or a ``bits`` key names no Linear/Conv layer, or a
            bit width is outside 2..8.
    """
    layers = [
        name for name, module in model.named_modules()
        if isinstance(module, LAYER_TYPES) and isinstance(getattr(module, "weight", None), Tensor)
    ]
    known = ", ".join(layers) or "none"
    if (pattern := first_unmatched(exclude, layers)) is not None:
        raise QuantError(f"exclude pattern {pattern!r} matches no Linear/Conv layer; layers are: {known}")
    if isinstance(bits, Mapping):
        unknown = [key for key in bits if key not in layers]
        if unknown:
            raise QuantError(f"bits given for {unknown[0]!r}, which is not a Linear/Conv layer; layers are: {known}")
        chosen = {name: bits.get(name) for name in layers}
    else:
        chosen = dict.fromkeys(layers, bits)
    result: dict[str, int | None] = {}
    for name, value in chosen.items():
        if value is not None:
            check_bits(value)
        excluded = matches_any(name, exclude)
        result[f"{name}.weight" if name else "weight"] = None if excluded else value
    return result


def _scale(weight: Tensor, spec: QuantSpec, name: str) -> tuple[Tensor, Tensor]:
    """The bfloat16-rounded min/max scale(s) of ``weight`` and the zero point(s), 0."""
    scale, zero_point = choose_qparams(weight, spec, name=name)
    return scale.to(torch.bfloat16).float(), zero_point


def weight_codes(
    weight: Tensor, bits: int, granularity: NonzeroGranularity, *, name: str = "weight"
) -> tuple[Tensor, Tensor]:
    """Signed codes ``q`` (``weight``'s shape, ``int8``) and the bfloat16-rounded scale(s) ``s``.

    Raises:
        QuantError: Bad bits, or NaN/inf in ``weight``.
    """
    spec = nonzero_spec(bits, granularity)
    scale, zero_point = _scale(weight, spec, name)
    return quantize(weight, scale, zero_point, spec, name=name), scale


def weight_values(codes: Tensor, scale: Tensor, granularity: NonzeroGranularity, dtype: torch.dtype) -> Tensor:
    """The weight ``ŵ = q · s`` in ``dtype`` from `weight_codes`."""
    zero_point = torch.zeros_like(scale, dtype=torch.int32)
    return dequantize(codes, scale, zero_point, granularity=granularity).to(dtype)


def quantize_nonzero_(
    model: nn.Module,
    bits: Mapping[str, int] | int,
    *,
    exclude: Sequence[str] = (),
    granularity: NonzeroGranularity = PerTensor(),
) -> dict[str, int]:
    """Replace Linear/Conv weights by their quantized values, exactly as `save_compressed` stores them.

    Zeros stay exactly zero; non-zeros become ``ŵ = q·s`` (see the module docstring). The
    operation is idempotent, and `save_compressed` of the result stores the same codes.
    Evaluate the model after this call to know the accuracy of the saved artefact.

    Args:
        model: Modified in place.
        bits: One bit width (2..8) for every layer, or layer name → bits (layers not listed
            stay in float).
        exclude: ``fnmatch`` patterns of layer names to keep in float.
        granularity: `PerTensor` or `PerChannel` (axis 0).

    Returns:
        Bits per quantized weight name (``"fc1.weight": 5``).

    Raises:
        QuantError: Bad bits, a pattern or key naming no layer, NaN/inf in a weight.
    """
    granularity = check_granularity(granularity)
    chosen = {name: b for name, b in weight_bits(model, bits, exclude).items() if b is not None}
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, b in chosen.items():
            weight = params[name]
            codes, scale = weight_codes(weight.detach(), b, granularity, name=name)
            weight.copy_(weight_values(codes, scale, granularity, weight.dtype))
    return chosen


def fake_quantize_nonzero(
    weight: Tensor, bits: int, *, granularity: NonzeroGranularity = PerTensor(), name: str = "weight"
) -> Tensor:
    """``weight`` on the quantizer's grid, with a straight-through gradient.

    `spiralkit.quant.affine.fake_quantize` with this quantizer's spec and bfloat16 scale: the
    forward value is exactly what `quantize_nonzero_` would store; the backward pass is the
    identity (Bengio et al. 2013's straight-through estimator; no weight is clamped, since
    ``max|w| / s ≤ Q + 0.25``), so training with it — Deep Compression's "trained
    quantization" step — moves the float weights under the grid. Zeros map to zero, so
    pruned weights stay pruned.

    Returns:
        A tensor of ``weight``'s dtype.
    """
    granularity = check_granularity(granularity)
    spec = nonzero_spec(bits, granularity)
    scale, zero_point = _scale(weight.detach(), spec, name)
    return fake_quantize(weight, scale, zero_point, spec, name=name).to(weight.dtype)
