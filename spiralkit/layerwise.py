"""Layer by layer on calibration data: the scheme Wanda, SparseGPT and GPTQ share.

The one-shot calibration methods change one layer at a time from statistics of that
layer's inputs ``X`` (rows: tokens or conv positions; columns: input features):

1. run the model on the calibration inputs with a forward hook on the next layer, which
   accumulates ``XᵀX`` (the Hessian ``H = 2XᵀX/N`` of the layer's reconstruction error
   ``‖WX − ŴX‖²``) and the column norms ``‖X_j‖₂``, and stops the forward pass there;
2. let the method rewrite the layer's weight from those statistics;
3. go on to the next layer, whose inputs now come from the *already changed* layers, so each
   layer compensates the errors of those before it (Frantar & Alistarh 2023, §3; Sun et al. 2024).

Layers that receive the very same input tensor (a transformer's query, key and value
projections) are handled in one pass. Memory is one ``d×d`` matrix per layer of the current
group, never the inputs of all layers. A Conv2d layer's input is unfolded into its patches
(``F.unfold``), so its weight is the matrix ``(out, in·kh·kw)``.

Nothing here knows a method: `calibrate_layers` calls a ``solve`` function per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spiralkit.errors import SpiralError
from spiralkit.modules import eval_mode

__all__ = ["CalibrationError", "InputStats", "calibrate_layers", "calibration_inputs", "input_rows", "weight_matrix"]

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
"""The layers the calibration methods apply to (their weight is a matrix over their input rows)."""


class CalibrationError(SpiralError):
    """A calibration method cannot run: no data, a layer it does not apply to, a layer never reached."""


@dataclass
class InputStats:
    """Statistics of one layer's inputs over the calibration set.

    Attributes:
        squares: ``Σ_rows x_j²`` per input column (``(d,)``, float64).
        gram: ``XᵀX`` (``(d, d)``, float32 accumulation), or None when not asked for.
        rows: how many rows (tokens, positions) were seen.
    """

    squares: Tensor
    gram: Tensor | None
    rows: int = 0

    @property
    def column_norms(self) -> Tensor:
        """``‖X_j‖₂`` per input column, over every calibration row (Wanda's activation norm)."""
        return self.squares.sqrt()

    def hessian(self) -> Tensor:
        """``H = 2XᵀX / N`` in float64 (the Hessian of ``‖WX − ŴX‖²/N`` in each row of ``W``).

        Raises:
            CalibrationError: the statistics were gathered without the Gram matrix.
        """
        if self.gram is None:
            raise CalibrationError("these input statistics have no Gram matrix (gathered with gram=False)")
        return 2.0 * self.gram.double() / max(self.rows, 1)

    def add(self, rows: Tensor) -> None:
        """Accumulate a block of input rows ``(r, d)``."""
        rows = rows.detach().float()
        self.squares += rows.double().pow(2).sum(0)
        if self.gram is not None:
            self.gram.addmm_(rows.t(), rows)
        self.rows += rows.shape[0]


def weight_matrix(layer: nn.Module) -> Tensor:
    """The layer's weight as the matrix ``(out, in)`` its calibration rows multiply (a view)."""
    weight = layer.weight
    return weight.reshape(weight.shape[0], -1)


def check_layer(name: str, layer: nn.Module) -> None:
    """Raise `CalibrationError` naming ``name`` when the calibration methods cannot handle ``layer``."""
    if not isinstance(layer, LAYER_TYPES):
        raise CalibrationError(f"layer {name!r} is a {type(layer).__name__}; calibration methods apply to "
                               "nn.Linear and nn.Conv2d only: exclude it")
    if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.padding_mode != "zeros"):
        raise CalibrationError(f"layer {name!r}: calibration methods need a Conv2d with groups=1 and zero padding "
                               f"(got groups={layer.groups}, padding_mode={layer.padding_mode!r}): exclude it")


def input_rows(layer: nn.Module, x: Tensor) -> Tensor:
    """The rows ``(N, in)`` that ``layer``'s weight matrix multiplies for the input ``x``."""
    if isinstance(layer, nn.Conv2d):
        patches = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,  # type: ignore[arg-type]
                           stride=layer.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def calibration_inputs(batches: Iterable[Any], samples: int) -> list[Any]:
    """The first ``samples`` examples of ``batches`` (``(x, y)`` pairs or bare inputs), as input batches.

    Raises:
        CalibrationError: ``batches`` yields no example.
    """
    chosen: list[Any] = []
    count = 0
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        take = min(samples - count, int(x.shape[0]))
        chosen.append(x[:take])
        count += take
        if count >= samples:
            break
    if not chosen:
        raise CalibrationError("calibration needs data: the calibration batches are empty")
    return chosen


class _Stop(Exception):
    """Raised in a hook to end a forward pass once the group's inputs are captured."""


def _next_group(
    model: nn.Module, layers: Mapping[str, nn.Module], inputs: Sequence[Any], *, gram: bool
) -> dict[str, InputStats]:
    """Statistics of the first layers (in execution order) among ``layers``, all fed the same tensor."""
    members: dict[str, InputStats] = {}
    leader: list[Any] = [None]  # this pass's input of the group, per batch
    first_batch = [True]

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def capture(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if leader[0] is None and (first_batch[0] or name in members):
                leader[0] = x
            if x is not leader[0] or (not first_batch[0] and name not in members):
                raise _Stop
            if name not in members:
                d = weight_matrix(module).shape[1]
                members[name] = InputStats(squares=torch.zeros(d, dtype=torch.float64),
                                           gram=torch.zeros(d, d) if gram else None)
            members[name].add(input_rows(module, x))
        return capture

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad(), eval_mode(model):
            for x in inputs:
                leader[0] = None
                try:
                    model(x)
                except _Stop:
                    pass
                first_batch[0] = False
    finally:
        for handle in handles:
            handle.remove()
    return members


def calibrate_layers(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    inputs: Sequence[Any],
    *,
    solve: Callable[[str, nn.Module, InputStats], None],
    gram: bool = True,
) -> list[str]:
    """Run ``solve(name, layer, stats)`` on each of ``layers``, sequentially (see the module docstring).

    Args:
        model: the model the layers belong to; run in eval mode without gradients.
        layers: the layers to change, by name (Linear or Conv2d).
        inputs: calibration input batches, each passed as ``model(x)``.
        solve: rewrites one layer's weight in place from its input statistics.
        gram: gather ``XᵀX`` (SparseGPT, GPTQ); without it only column norms (Wanda).

    Returns:
        The layer names in the order they were solved (the model's execution order).

    Raises:
        CalibrationError: no input batch, a layer of another type, or layers that the
            calibration inputs never reach (named).
    """
    if not inputs:
        raise CalibrationError("calibration needs at least one input batch")
    for name, layer in layers.items():
        check_layer(name, layer)
    remaining = dict(layers)
    order: list[str] = []
    while remaining:
        group = _next_group(model, remaining, inputs, gram=gram)
        if not group:
            missing = ", ".join(islice(remaining, 10))
            raise CalibrationError(f"the calibration inputs never reach layer(s) {missing}: exclude them")
        for name, stats in group.items():
            solve(name, remaining.pop(name), stats)
            order.append(name)
    return order
