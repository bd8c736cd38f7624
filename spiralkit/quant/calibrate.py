"""Calibration: choosing the clipping range ``[lo, hi]`` of a tensor from observed data.

Three methods, as typed configs dispatched by type:

* `MinMax` — the observed minimum and maximum: nothing is clipped, outliers stretch the grid.
* `Percentile` — the ``q``-th and ``(100 − q)``-th percentiles (for a symmetric spec, the
  ``q``-th percentile of ``|x|``): a few outliers are clipped so the bulk gets finer steps.
* `MSE` — the shrunken min/max range ``α·[lo, hi]``, ``α ∈ {1/grid, 2/grid, …, 1}``, that
  minimises the quantization error ``‖x − x̂‖²`` of the observed samples (the "MSE" range
  setting of e.g. Banner et al. 2019, Nagel et al. 2021 "A White Paper on Neural Network
  Quantization", §3.4).

An `Observer` accumulates statistics over calibration batches (activations) and turns them
into a scale and zero point for a `QuantSpec`; `calibrate` does the same for one tensor
(weights). Minima and maxima are tracked exactly over every batch. Percentile and MSE work
on a bounded *reservoir* of samples (Vitter's algorithm R, column-wise so every scale entry
keeps samples from the same positions), drawn with a seeded generator: the same batches in
the same order give the same result.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from torch import Tensor

from spiralkit.configs import kind_from_string
from spiralkit.quant.affine import (
    Granularity,
    PerChannel,
    PerGroup,
    PerTensor,
    QuantError,
    QuantSpec,
    _channel_axis,
    _grouped,
    check_finite,
    qparam_shape,
    qparams_from_range,
    tensor_range,
)

__all__ = ["MSE", "Calibration", "MinMax", "Observer", "Percentile", "calibrate"]

DEFAULT_MAX_SAMPLES = 1 << 20


class MinMax(BaseModel):
    """The observed range: ``lo = min x``, ``hi = max x``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["min-max"] = "min-max"


class Percentile(BaseModel):
    """Clip to the ``q``-th percentile (and the ``(100 − q)``-th at the bottom).

    Attributes:
        q: Percentile in [50, 100]; 100 is min/max of the stored samples.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["percentile"] = "percentile"
    q: float = Field(default=99.99, ge=50, le=100)


class MSE(BaseModel):
    """Search ``α·[lo, hi]`` over ``α = i / grid``, ``i = 1..grid``, for the least ``‖x − x̂‖²``.

    Attributes:
        grid: Number of shrink factors tried.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["mse"] = "mse"
    grid: int = Field(default=100, ge=1)


Calibration = Annotated[MinMax | Percentile | MSE, Field(discriminator="kind"), BeforeValidator(kind_from_string)]


class Observer:
    """Running statistics of one tensor over calibration batches.

    Args:
        method: `MinMax`, `Percentile` or `MSE`.
        granularity: Which elements share a scale; must match the spec given to `qparams`.
            For activations ``(N, C, …)`` per-channel is ``PerChannel(axis=1)``.
        name: What is observed (``"fc1 input"``), for error messages.
        max_samples: Bound on the samples kept for `Percentile` and `MSE`, split evenly
            among the scale entries (at least one each).
        seed: Seed of the reservoir sampling.

    Example:
        >>> observer = Observer(Percentile(q=99.9), name="fc1 input")
        >>> for x in batches:
        ...     observer.update(x)
        >>> scale, zero_point = observer.qparams(QuantSpec(bits=8))
    """

    def __init__(
        self,
        method: Calibration = MinMax(),
        *,
        granularity: Granularity = PerTensor(),
        name: str = "tensor",
        max_samples: int = DEFAULT_MAX_SAMPLES,
        seed: int = 0,
    ) -> None:
        if max_samples < 1:
            raise QuantError(f"observer {name!r}: max_samples must be >= 1, got {max_samples}")
        self.method = method
        self.granularity = granularity
        self.name = name
        self.max_samples = max_samples
        self._generator = torch.Generator().manual_seed(seed)
        self._shape: tuple[int, ...] | None = None
        self._lo: Tensor | None = None
        self._hi: Tensor | None = None
        self._samples: Tensor | None = None  # (rows, ≤ capacity)
        self._seen = 0  # columns offered to the reservoir so far

    @property
    def observed(self) -> bool:
        """Whether any data was observed."""
        return self._lo is not None

    @property
    def stored_samples(self) -> int:
        """Samples kept per scale entry for `Percentile` / `MSE` (0 for `MinMax`)."""
        return 0 if self._samples is None else self._samples.shape[1]

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add one batch. Empty tensors are ignored.

        Raises:
            QuantError: ``x`` holds NaN/inf, or its shape gives a different number of scale
                entries than earlier batches.
        """
        if x.numel() == 0:
            return
        check_finite(x, self.name)
        x = x.detach().float().cpu()
        shape = qparam_shape(x.shape, self.granularity)
        if self._shape is not None and shape != self._shape:
            raise QuantError(
                f"observer {self.name!r}: a batch of shape {tuple(x.shape)} needs scale shape {shape}, "
                f"earlier batches needed {self._shape}"
            )
        lo, hi = (t.reshape(-1) for t in tensor_range(x, self.granularity, name=self.name))
        if self._lo is None or self._hi is None:
            self._shape, self._lo, self._hi = shape, lo, hi
        else:
            self._lo, self._hi = torch.minimum(self._lo, lo), torch.maximum(self._hi, hi)
        if not isinstance(self.method, MinMax):
            self._add_samples(_rows(x, self.granularity, self.name))

    def qparams(self, spec: QuantSpec) -> tuple[Tensor, Tensor]:
        """Scale and zero point for ``spec`` from what was observed.

        Returns:
            ``(scale, zero_point)`` of shape `qparam_shape` (float32, int32).

        Raises:
            QuantError: Nothing was observed, or ``spec.granularity`` differs from the
                observer's.
        """
        if self._lo is None or self._hi is None or self._shape is None:
            raise QuantError(f"no calibration data was observed for {self.name}")
        if spec.granularity != self.granularity:
            raise QuantError(
                f"observer {self.name!r} collected {self.granularity.kind} statistics, "
                f"but the spec asks for {spec.granularity.kind}"
            )
        lo, hi = self._range(spec)
        scale, zero_point = qparams_from_range(lo, hi, spec, name=self.name)
        return scale.reshape(self._shape), zero_point.reshape(self._shape)

    def _range(self, spec: QuantSpec) -> tuple[Tensor, Tensor]:
        assert self._lo is not None and self._hi is not None
        match self.method:
            case MinMax():
                return self._lo, self._hi
            case Percentile(q=q):
                assert self._samples is not None
                return _percentile_range(self._samples, q / 100, symmetric=spec.symmetric and spec.signed)
            case MSE(grid=grid):
                assert self._samples is not None
                return _mse_range(self._samples, self._lo, self._hi, spec, grid=grid)
        raise QuantError(f"unknown calibration method {self.method!r}")

    def _add_samples(self, rows: Tensor) -> None:
        """Reservoir sampling (algorithm R) over the columns of ``rows``."""
        capacity = max(math.ceil(self.max_samples / rows.shape[0]), 1)
        if self._samples is None:
            self._samples = rows.new_empty((rows.shape[0], 0))
        free = capacity - self._samples.shape[1]
        if free > 0:
            self._samples = torch.cat([self._samples, rows[:, :free]], dim=1)
            self._seen += min(free, rows.shape[1])
            rows = rows[:, free:]
        if rows.shape[1] == 0:
            return
        count = rows.shape[1]
        index = torch.arange(self._seen, self._seen + count, dtype=torch.float64)
        slots = (torch.rand(count, generator=self._generator, dtype=torch.float64) * (index + 1)).long()
        self._seen += count
        accepted = torch.nonzero(slots < capacity).reshape(-1).numpy()
        if accepted.size == 0:
            return
        # Several columns may land in one slot; as in the sequential algorithm, the last wins.
        targets = slots.numpy()[accepted]
        _, last_reversed = np.unique(targets[::-1], return_index=True)
        last = accepted[::-1][last_reversed]
        self._samples[:, torch.from_numpy(slots.numpy()[last])] = rows[:, torch.from_numpy(last)]


def calibrate(
    x: Tensor, method: Calibration, spec: QuantSpec, *, name: str = "tensor"
) -> tuple[Tensor, Tensor]:
    """Scale and zero point of one tensor (a weight) by ``method`` at ``spec``'s granularity.

    Every element is used: the reservoir is as large as the tensor.

    Returns:
        ``(scale, zero_point)`` of shape `qparam_shape`.
    """
    observer = Observer(method, granularity=spec.granularity, name=name, max_samples=max(x.numel(), 1))
    observer.update(x)
    return observer.qparams(spec)


# --------------------------------------------------------------------------- helpers


def _rows(x: Tensor, granularity: Granularity, name: str) -> Tensor:
    """``x`` as ``(scale entries, elements)``; short last groups are padded with NaN."""
    match granularity:
        case PerTensor():
            return x.reshape(1, -1)
        case PerChannel():
            axis = _channel_axis(granularity, x.dim(), name)
            return x.movedim(axis, 0).reshape(x.shape[axis], -1)
        case PerGroup(size=size):
            return _grouped(x, size, name, fill=float("nan")).reshape(-1, size)
    raise QuantError(f"unknown granularity {granularity!r}")


def _row_quantile(samples: Tensor, p: float) -> Tensor:
    """The ``p``-quantile of each row (linear interpolation), ignoring NaN padding."""
    ordered, _ = torch.sort(samples.double(), dim=1)  # NaN sorts last
    valid = (~torch.isnan(samples)).sum(dim=1)
    position = p * (valid - 1).double()
    below = position.floor().long()
    above = position.ceil().long()
    lower = ordered.gather(1, below[:, None])[:, 0]
    upper = ordered.gather(1, above[:, None])[:, 0]
    return (lower + (upper - lower) * (position - below)).float()


def _percentile_range(samples: Tensor, p: float, *, symmetric: bool) -> tuple[Tensor, Tensor]:
    if symmetric:
        amax = _row_quantile(samples.abs(), p)
        return -amax, amax
    return _row_quantile(samples, 1.0 - p), _row_quantile(samples, p)


def _mse_range(samples: Tensor, lo: Tensor, hi: Tensor, spec: QuantSpec, *, grid: int) -> tuple[Tensor, Tensor]:
    """The ``α·[lo, hi]`` with the least squared error per row; ties keep the larger ``α``."""
    valid = ~torch.isnan(samples)
    values = torch.where(valid, samples, 0.0)
    best_error = torch.full((samples.shape[0],), float("inf"), dtype=torch.float64)
    best_lo, best_hi = lo.clone(), hi.clone()
    for step in range(grid, 0, -1):
        alpha = step / grid
        scale, zero_point = qparams_from_range(lo * alpha, hi * alpha, spec)
        s, z = scale[:, None], zero_point[:, None].float()
        restored = (torch.clamp(torch.round(values / s) + z, spec.qmin, spec.qmax) - z) * s
        error = torch.where(valid, (values - restored) ** 2, 0.0).double().sum(dim=1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_lo = torch.where(better, lo * alpha, best_lo)
        best_hi = torch.where(better, hi * alpha, best_hi)
    return best_lo, best_hi
