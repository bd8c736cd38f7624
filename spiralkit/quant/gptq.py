"""GPTQ: weight-only quantization that corrects each rounding with the layer's input Hessian.

Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers". Each layer's weight ``W`` ``(out, in)`` is quantized column by column to
minimise the reconstruction error ``‖WX − ŴX‖²`` on calibration inputs ``X``: with
``H = 2XᵀX/N + λI`` and ``F`` the columns not yet quantized, column ``i`` is rounded to the
grid and its error ``e = (w_i − q_i) / [H_F⁻¹]_ii`` is pushed onto the columns still to come,
``w_F ← w_F − e · [H_F⁻¹]_{i,F}`` (the OBS update, read off the upper Cholesky factor of
``H⁻¹``; lazy updates in blocks of ``blocksize`` columns). With ``act_order`` the columns are
visited by decreasing ``H_jj`` (the most active inputs first, while many columns remain to
absorb their errors).

The grid is exactly the one of `spiralkit.quant.weight_only` — symmetric, restricted signed
codes, one scale per output channel or per group of ``group_size`` consecutive input columns
— and the scales are fixed from the original weights before any update ("static groups"),
so groups stay contiguous in the original column order even with ``act_order``. The result
is therefore the existing `WeightOnlyLinear`/`WeightOnlyConv2d` modules (codes + scales), and
round-to-nearest (`quantize_weights_`) is the same format with the same scales: the two
differ only in which codes they choose.

Layers are quantized sequentially (`spiralkit.layerwise`): each sees the outputs of the
already-quantized layers before it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from spiralkit.layerwise import CalibrationError, InputStats, calibrate_layers, calibration_inputs, weight_matrix
from spiralkit.patterns import first_unmatched, matches_any
from spiralkit.quant.affine import QuantError, choose_qparams, expand_qparam
from spiralkit.quant.weight_only import WeightOnlyConfig, WeightOnlyConv2d, WeightOnlyLinear, _swap, default_group_size

__all__ = ["GPTQConfig", "gptq_quantize", "quantize_gptq_"]


class GPTQConfig(BaseModel):
    """GPTQ weight-only quantization of Linear and Conv2d layers.

    Attributes:
        bits: 3, 4 or 8.
        group_size: input columns sharing one scale (``None``: one scale per output channel);
            when not given, 32 for 3 and 4 bits, per channel for 8 bits (as `WeightOnlyConfig`).
        act_order: visit columns by decreasing Hessian diagonal.
        samples: calibration examples.
        blocksize: columns per lazy batch update.
        damp: ``λ`` as a fraction of the mean diagonal of ``H``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["gptq"] = "gptq"
    bits: Literal[3, 4, 8] = 4
    group_size: int | None = Field(default=None, gt=0)
    act_order: bool = False
    samples: int = Field(default=128, gt=0)
    blocksize: int = Field(default=128, gt=0)
    damp: float = Field(default=0.01, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _default_group_size(cls, data: Any) -> Any:
        return default_group_size(data, bits=4)

    @property
    def weight_only(self) -> WeightOnlyConfig:
        """The storage format of the result."""
        return WeightOnlyConfig(bits=self.bits, group_size=self.group_size)


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    *,
    config: WeightOnlyConfig,
    act_order: bool = False,
    blocksize: int = 128,
    damp: float = 0.01,
    keep: Tensor | None = None,
    name: str = "weight",
) -> tuple[Tensor, Tensor]:
    """GPTQ on one weight matrix (see the module docstring).

    Args:
        weight: ``(out, in)``; not modified.
        hessian: ``(in, in)``, ``2XᵀX/N`` of the layer's inputs.
        config: bits and group size of the grid (`WeightOnlyConfig`).
        act_order: visit columns by decreasing ``H_jj``.
        blocksize: columns per lazy batch update.
        damp: dampening, a fraction of the mean diagonal of ``H``.
        keep: bool ``(out, in)`` pruning keep-mask: pruned weights get code 0 (their error,
            if any, is absorbed by the columns still to come), so a pruned model stays sparse.
        name: the layer, for error messages.

    Returns:
        Integer codes ``(out, in)`` (int8) and the scales (as `WeightOnlyConfig` lays them out).
    """
    w = weight.detach().double().clone()
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0  # no input ever reaches these columns: any code does; 0 is the smallest error elsewhere
    spec = config.spec
    scale, zero_point = choose_qparams(w.float(), spec, name=f"{name}.weight")  # static: from the original weights
    column_scale = expand_qparam(scale, w.shape, spec.granularity).double().expand(w.shape)  # each column's scales
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(w.shape[1])
    w, h, column_scale = w[:, order], h[order][:, order], column_scale[:, order]
    kept = None if keep is None else keep.reshape(w.shape)[:, order]
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    try:
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError:
        raise CalibrationError(f"layer {name!r}: the input Hessian is not positive definite even with damp={damp}; "
                               "raise damp or give more calibration samples") from None
    codes = torch.zeros_like(w)
    cols = w.shape[1]
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block, u_block = w[:, start:end].clone(), u[start:end, start:end]
        errors = torch.zeros_like(block)
        for i in range(end - start):
            s = column_scale[:, start + i]
            q = torch.clamp(torch.round(block[:, i] / s), spec.qmin, spec.qmax)
            if kept is not None:
                q = q.masked_fill(~kept[:, start + i], 0.0)
            codes[:, start + i] = q
            error = (block[:, i] - q * s) / u_block[i, i]
            block[:, i:] -= error.unsqueeze(1) * u_block[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ u[start:end, end:]
    restored = torch.empty_like(codes)
    restored[:, order] = codes
    return restored.to(torch.int8), scale


def quantize_gptq_(
    model: nn.Module,
    config: GPTQConfig,
    batches: Iterable[Any],
    *,
    exclude: Sequence[str] = (),
    masks: Mapping[str, Tensor] | None = None,
) -> dict[str, int]:
    """Quantize every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` with GPTQ, in place, sequentially.

    Each layer's weight is replaced by its dequantized GPTQ weight while the following layers
    are calibrated (they see the quantized model's activations), then every layer becomes a
    `WeightOnlyLinear`/`WeightOnlyConv2d` holding GPTQ's codes.

    Args:
        model: modified in place.
        config: bits, group size, act-order, calibration size.
        batches: calibration data: ``(x, y)`` batches or bare inputs; the first
            ``config.samples`` examples are used.
        exclude: ``fnmatch`` patterns of layer names kept in float; each must match a layer.
        masks: pruning keep-masks by parameter name (``"fc1.weight"``): pruned weights stay
            exactly zero (code 0).

    Returns:
        Bits per layer name (the float width for excluded layers), like `quantize_weights_`.

    Raises:
        QuantError: no Linear/Conv2d layer, or an exclude pattern matching none.
        CalibrationError: no calibration data, or a layer GPTQ cannot handle (named).
    """
    layers = {name: m for name, m in model.named_modules() if name and isinstance(m, (nn.Linear, nn.Conv2d))}
    if not layers:
        raise QuantError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d submodule to quantize")
    if (pattern := first_unmatched(exclude, layers)) is not None:
        raise QuantError(f"exclude pattern {pattern!r} matches no Linear/Conv2d layer; layers are: {', '.join(layers)}")
    chosen = {name: layer for name, layer in layers.items() if not matches_any(name, exclude)}
    storage = config.weight_only
    results: dict[str, tuple[Tensor, Tensor]] = {}

    def solve(name: str, layer: nn.Module, stats: InputStats) -> None:
        matrix = weight_matrix(layer)
        keep = masks.get(f"{name}.weight") if masks else None
        codes, scale = gptq_quantize(matrix, stats.hessian(), config=storage, act_order=config.act_order,
                                     blocksize=config.blocksize, damp=config.damp, keep=keep, name=name)
        results[name] = (codes, scale)
        with torch.no_grad():  # the following layers see this layer's quantized outputs
            matrix.copy_((codes.double() * expand_qparam(scale, codes.shape, storage.spec.granularity)).to(matrix.dtype))

    calibrate_layers(model, chosen, calibration_inputs(batches, config.samples), solve=solve, gram=True)
    replacements: dict[int, nn.Module] = {}
    for name, layer in chosen.items():
        codes, scale = results[name]
        cls = WeightOnlyLinear if isinstance(layer, nn.Linear) else WeightOnlyConv2d
        replacements[id(layer)] = cls(layer, storage, name=name, codes=codes, scale=scale)  # type: ignore[arg-type]
    _swap(model, replacements)
    return {name: config.bits if name in chosen else layer.weight.element_size() * 8 for name, layer in layers.items()}
