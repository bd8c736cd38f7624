"""One-shot pruning from calibration data, layer by layer: Wanda and SparseGPT.

Both run on `spiralkit.layerwise.calibrate_layers` (each layer sees the outputs of the
already-pruned layers before it) and prune to a sparsity or to an N:M pattern
(`spiralkit.prune.nm`). They are criteria of `UnstructuredPrune` (``criterion: wanda`` /
``criterion: sparsegpt``), with the calibration size on the criterion.

* **Wanda** (Sun et al. 2024, "A Simple and Effective Pruning Approach for Large Language
  Models"): the score of weight ``W_ij`` is ``|W_ij| · ‖X_j‖₂``, the norm of input feature
  ``j`` over all calibration rows (tokens); weights are compared within their output row
  (``round(s·in)`` lowest pruned per row) or within each N:M group. The remaining weights
  are not changed.
* **SparseGPT** (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be
  Accurately Pruned in One-Shot"): the layer's reconstruction error ``‖WX − ŴX‖²`` is
  reduced by optimal brain surgeon updates. With ``H = 2XᵀX/N + λI`` (``λ`` = ``damp`` ×
  the mean diagonal), columns are visited left to right; when column ``i`` is pruned or
  kept, the error ``e = (w_i − ŵ_i) / [H_F⁻¹]_ii`` is spread over the columns still to come,
  ``w_F ← w_F − e · [H_F⁻¹]_{i,F}`` with ``F = {i, …, d−1}``. The inverses of the trailing
  sub-matrices are the rows of the upper Cholesky factor of ``H⁻¹`` (scaled), computed once.
  The mask is chosen per block of ``blocksize`` columns by the OBS saliency
  ``w² / [H_F⁻¹]_ii`` (adaptive mask selection), or per N:M group as its columns come.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from spiralkit.errors import PruneError
from spiralkit.layerwise import CalibrationError, InputStats, calibrate_layers, calibration_inputs, weight_matrix
from spiralkit.prune.nm import NM, nm_keep_mask
from spiralkit.prune.unstructured import Masks

__all__ = [
    "CalibratedCriterion",
    "SparseGPT",
    "Wanda",
    "prune_rows",
    "sparsegpt_prune",
    "wanda_scores",
]


@runtime_checkable
class CalibratedCriterion(Protocol):
    """A criterion that prunes layer by layer from calibration data (and may change the kept weights)."""

    kind: str

    def prune_layers(self, model: nn.Module, weights: Mapping[str, nn.Parameter], *, batches: Iterable[Any],
                     sparsity: float, pattern: NM | None, existing: Masks | None) -> Masks:
        """Prune ``weights`` of ``model`` in place; return their keep-masks."""
        ...


def wanda_scores(weight: Tensor, column_norms: Tensor) -> Tensor:
    """``|W_ij| · ‖X_j‖₂`` for a weight matrix ``(out, in)`` and the input column norms ``(in,)``."""
    return weight.detach().abs().double() * column_norms.double().unsqueeze(0)


def prune_rows(scores: Tensor, *, sparsity: float) -> Tensor:
    """Keep-mask pruning the ``round(sparsity·in)`` lowest scores of every row (ties: earlier column pruned)."""
    count = round(sparsity * scores.shape[1])
    order = torch.argsort(scores, dim=1, stable=True)[:, :count]
    return torch.ones_like(scores, dtype=torch.bool).scatter_(1, order, False)


def _forced(scores: Tensor, prune: Tensor | None) -> Tensor:
    """``scores`` with the weights that must go (earlier rounds' pruned ones) ranked lowest."""
    return scores if prune is None else scores.masked_fill(prune, float("-inf"))


def _upper_inverse_factor(hessian: Tensor, *, damp: float, name: str) -> Tensor:
    """The upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``) after dampening ``H``.

    Row ``i`` of ``U`` is ``[H_F⁻¹]_{i,F} / sqrt([H_F⁻¹]_ii)`` with ``H_F`` the block of ``H``
    on the columns ``F = {i, …, d−1}`` (Frantar et al. 2023), so one factorisation gives the
    OBS quantities of every column: ``[H_F⁻¹]_ii = U_ii²``.

    Raises:
        CalibrationError: ``H`` is not positive definite (names the layer).
    """
    h = hessian.double().clone()
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    try:
        factor = torch.linalg.cholesky(h)
        inverse = torch.cholesky_inverse(factor)
        return torch.linalg.cholesky(inverse, upper=True)
    except RuntimeError:
        raise CalibrationError(f"layer {name!r}: the input Hessian is not positive definite even with damp={damp}; "
                               "raise damp or give more calibration samples") from None


def _dead_columns(hessian: Tensor, weight: Tensor) -> Tensor:
    """Columns no calibration input ever reached (``H_jj = 0``): their Hessian diagonal is set to 1, their weights to 0."""
    dead = hessian.diagonal() == 0
    hessian.diagonal()[dead] = 1.0
    weight[:, dead] = 0.0
    return dead


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    *,
    sparsity: float,
    pattern: NM | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
    prune: Tensor | None = None,
    name: str = "weight",
) -> tuple[Tensor, Tensor]:
    """SparseGPT on one weight matrix (see the module docstring).

    Args:
        weight: ``(out, in)``; not modified.
        hessian: ``(in, in)``, ``2XᵀX/N`` of the layer's inputs.
        sparsity: fraction of each block's weights to prune (unused with ``pattern``).
        pattern: prune to N:M instead (``blocksize`` must be a multiple of ``m``).
        blocksize: columns whose mask is chosen at once (lazy batch updates).
        damp: ``λ`` as a fraction of the mean diagonal of ``H``.
        prune: bool ``(out, in)``, weights that must be pruned (an earlier round's).
        name: the layer, for error messages.

    Returns:
        The new weight (float64, pruned weights exactly 0) and its keep-mask.
    """
    if pattern is not None and blocksize % pattern.m:
        raise PruneError(f"sparsegpt blocksize {blocksize} is not a multiple of the pattern's m={pattern.m}")
    w = weight.detach().double().clone()
    h = hessian.double().clone()
    _dead_columns(h, w)
    u = _upper_inverse_factor(h, damp=damp, name=name)
    rows, cols = w.shape
    keep = torch.ones_like(w, dtype=torch.bool)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block, u_block = w[:, start:end].clone(), u[start:end, start:end]
        forced = prune[:, start:end] if prune is not None else None
        errors = torch.zeros_like(block)
        diag = u_block.diagonal()
        if pattern is None:
            saliency = _forced(block.pow(2) / diag.pow(2).unsqueeze(0), forced)
            count = round(sparsity * saliency.numel())
            lowest = torch.argsort(saliency.reshape(-1), stable=True)[:count]
            keep_block = torch.ones(saliency.numel(), dtype=torch.bool)
            keep_block[lowest] = False
            keep_block = keep_block.reshape(block.shape)
        else:
            keep_block = torch.ones_like(block, dtype=torch.bool)
        if forced is not None:
            keep_block &= ~forced
        for i in range(end - start):
            if pattern is not None and i % pattern.m == 0:
                cols_nm = slice(i, i + pattern.m)
                saliency = block[:, cols_nm].pow(2) / diag[cols_nm].pow(2).unsqueeze(0)
                saliency = _forced(saliency, forced[:, cols_nm] if forced is not None else None)
                keep_block[:, cols_nm] = nm_keep_mask(saliency, pattern, name=name)
                if forced is not None:
                    keep_block[:, cols_nm] &= ~forced[:, cols_nm]
            column = block[:, i]
            pruned_column = column.masked_fill(~keep_block[:, i], 0.0)
            error = (column - pruned_column) / diag[i]
            block[:, i:] -= error.unsqueeze(1) * u_block[i, i:].unsqueeze(0)
            block[:, i] = pruned_column  # exact zeros where pruned (the update leaves rounding there)
            errors[:, i] = error
        w[:, start:end] = block
        w[:, end:] -= errors @ u[start:end, end:]
        keep[:, start:end] = keep_block
    return w.masked_fill(~keep, 0.0), keep


def _prune_calibrated(
    model: nn.Module,
    weights: Mapping[str, nn.Parameter],
    *,
    batches: Iterable[Any],
    samples: int,
    gram: bool,
    existing: Masks | None,
    solve: Callable[[str, Tensor, InputStats, Tensor | None], tuple[Tensor | None, Tensor]],
) -> Masks:
    """Drive ``solve(layer, W, stats, must_prune) -> (new W or None, keep)`` over the layers, sequentially."""
    modules = dict(model.named_modules())
    layers: dict[str, nn.Module] = {}
    for param_name in weights:
        layer_name = param_name.removesuffix(".weight")
        if layer_name not in modules or param_name == layer_name:
            raise PruneError(f"{param_name!r} is not the weight of a layer of the model")
        layers[layer_name] = modules[layer_name]
    found: Masks = {}

    def solve_layer(name: str, layer: nn.Module, stats: InputStats) -> None:
        matrix = weight_matrix(layer)
        earlier = existing.get(f"{name}.weight") if existing else None
        must_prune = None if earlier is None else ~earlier.reshape(matrix.shape)
        new_weight, keep = solve(name, matrix, stats, must_prune)
        if must_prune is not None:
            keep = keep & ~must_prune  # what an earlier round pruned stays pruned, whatever the count
        with torch.no_grad():
            if new_weight is not None:
                matrix.copy_(new_weight.to(matrix.dtype))
            matrix.masked_fill_(~keep, 0.0)
        found[f"{name}.weight"] = keep.reshape(layer.weight.shape)

    calibrate_layers(model, layers, calibration_inputs(batches, samples), solve=solve_layer, gram=gram)
    return {name: found[name] for name in weights}


class Wanda(BaseModel):
    """Wanda: prune by ``|W_ij|·‖X_j‖₂`` per output row, from ``samples`` calibration examples.

    See the module docstring. The recipe's ``scope`` does not apply (rows are compared).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["wanda"] = "wanda"
    samples: int = Field(default=128, gt=0)

    def prune_layers(self, model: nn.Module, weights: Mapping[str, nn.Parameter], *, batches: Iterable[Any],
                     sparsity: float, pattern: NM | None, existing: Masks | None) -> Masks:
        """Prune each layer (sequentially) to ``sparsity`` per row, or to ``pattern``; returns the masks."""

        def solve(name: str, matrix: Tensor, stats: InputStats, must_prune: Tensor | None) -> tuple[None, Tensor]:
            scores = _forced(wanda_scores(matrix, stats.column_norms), must_prune)
            keep = nm_keep_mask(scores, pattern, name=name) if pattern is not None else prune_rows(scores, sparsity=sparsity)
            return None, keep

        return _prune_calibrated(model, weights, batches=batches, samples=self.samples, gram=False,
                                 existing=existing, solve=solve)

    def weight_scores(self, *, model: nn.Module, weights: Mapping[str, nn.Parameter],
                      batches: Iterable[tuple[Tensor, Tensor]], loss_fn: object) -> dict[str, Tensor]:
        """Wanda's scores of the unchanged model (no weight is pruned), e.g. for a global ranking."""
        scores: dict[str, Tensor] = {}

        def solve(name: str, matrix: Tensor, stats: InputStats, must_prune: Tensor | None) -> tuple[None, Tensor]:
            scores[f"{name}.weight"] = wanda_scores(matrix, stats.column_norms).float().reshape(
                weights[f"{name}.weight"].shape)
            return None, torch.ones_like(matrix, dtype=torch.bool)

        _prune_calibrated(model, weights, batches=batches, samples=self.samples, gram=False, existing=None, solve=solve)
        return {name: scores[name] for name in weights}


class SparseGPT(BaseModel):
    """SparseGPT: prune with OBS updates of the remaining weights (see the module docstring).

    Attributes:
        samples: calibration examples.
        blocksize: columns whose mask is chosen together (a multiple of an N:M pattern's m).
        damp: dampening of the Hessian, a fraction of its mean diagonal.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["sparsegpt"] = "sparsegpt"
    samples: int = Field(default=128, gt=0)
    blocksize: int = Field(default=128, gt=0)
    damp: float = Field(default=0.01, gt=0)

    def prune_layers(self, model: nn.Module, weights: Mapping[str, nn.Parameter], *, batches: Iterable[Any],
                     sparsity: float, pattern: NM | None, existing: Masks | None) -> Masks:
        """Prune and update each layer (sequentially) to ``sparsity`` or ``pattern``; returns the masks."""

        def solve(name: str, matrix: Tensor, stats: InputStats, must_prune: Tensor | None) -> tuple[Tensor, Tensor]:
            return sparsegpt_prune(matrix, stats.hessian(), sparsity=sparsity, pattern=pattern,
                                   blocksize=self.blocksize, damp=self.damp, prune=must_prune, name=name)

        return _prune_calibrated(model, weights, batches=batches, samples=self.samples, gram=True,
                                 existing=existing, solve=solve)

    def weight_scores(self, *, model: nn.Module, weights: Mapping[str, nn.Parameter],
                      batches: Iterable[tuple[Tensor, Tensor]], loss_fn: object) -> dict[str, Tensor]:
        """Not a score: SparseGPT changes the weights it keeps, so it only prunes (`prune_layers`)."""
        raise PruneError("criterion sparsegpt changes the weights it keeps: it prunes (prune_layers), it does not "
                         "score weights for another pruner")
