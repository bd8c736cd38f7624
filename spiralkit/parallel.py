"""Data-parallel processes launched by ``torchrun``: who this process is, and the few collectives a run needs.

``torchrun --nproc-per-node N spiral run RECIPE`` starts N copies of the command, each with
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in its environment. `launched` reads them once,
at the command's entry, and starts the process group (gloo: spiralkit trains on the CPU);
the resulting `World` value is then passed explicitly to whatever needs it. A plain
``spiral run`` is `SINGLE`, the world of one process, whose collectives are no-ops.

Data parallelism is the one of ``DistributedDataParallel``: every rank holds the same model,
trains on its shard of each global batch, and the gradients are averaged over the ranks
before each optimizer step, so N ranks take exactly the steps one process takes on the
global batch (up to floating-point summation order). The averaging is done by the training
loop (`average_gradients`), not by the ``DistributedDataParallel`` wrapper: distillation
objectives tap the student's modules by name and train adapters of their own, and both
see the model as it is, without the wrapper's ``module.`` prefix.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from spiralkit.errors import SpiralError

__all__ = ["SINGLE", "World", "launched", "world_from_env"]

T = TypeVar("T")

TIMEOUT = datetime.timedelta(hours=1)
"""How long a rank waits for the others at a collective: rank 0 alone evaluates and measures
every model while the others wait, which takes minutes on a large validation split. A rank
that dies is noticed at once (torchrun stops the others); the timeout only ends real hangs."""


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes of one run.

    Attributes:
        size: number of processes (``WORLD_SIZE``); 1 without torchrun.
        rank: this process's index, 0 ≤ rank < size; rank 0 alone writes the run directory.
        local_rank: its index on this machine (``LOCAL_RANK``).
        backend: the process group's backend (``gloo``), or ``none`` for one process.
    """

    size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str = "none"

    @property
    def main(self) -> bool:
        """This process writes files and prints: rank 0."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        """More than one process."""
        return self.size > 1

    def __str__(self) -> str:
        return f"{self.size} processes ({self.backend})" if self.parallel else "1 process"

    def shard(self, loader: T) -> T:
        """This rank's share of ``loader``: same global batch, ``batch_size / size`` examples per rank.

        The global batch of step ``k`` is the one a single process would draw (see
        `spiralkit.data.TensorLoader.shard`, the in-memory `DistributedSampler`), split
        between the ranks, so N processes take the same optimizer steps as one.

        Raises:
            SpiralError: the loader cannot be sharded, or its batch size is not a multiple of ``size``.
        """
        if not self.parallel:
            return loader
        shard = getattr(loader, "shard", None)
        batch_size = getattr(loader, "batch_size", None)
        if shard is None or not isinstance(batch_size, int):
            raise SpiralError(f"data-parallel training needs a loader that can be sharded (spiralkit's own data "
                              f"sources); {type(loader).__name__} cannot")
        if batch_size % self.size:
            raise SpiralError(f"data.batch_size {batch_size} is the global batch and must be a multiple of the "
                              f"{self.size} processes (each takes an equal share)")
        return shard(self.rank, self.size, batch_size=batch_size // self.size)

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.parallel:
            dist.barrier()

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (plain data: metrics, states, masks)."""
        if not self.parallel:
            return value
        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]  # type: ignore[return-value]

    def check_same(self, what: str, value: object) -> None:
        """Raise unless every rank holds an equal ``value`` (e.g. the model's parameter shapes).

        Raises:
            SpiralError: the ranks differ; the message names ``what`` and the first rank that differs.
        """
        if not self.parallel:
            return
        values: list[object] = [None] * self.size
        dist.all_gather_object(values, value)
        for rank, other in enumerate(values):
            if other != values[0]:
                raise SpiralError(f"data-parallel ranks disagree on {what}: rank {rank} differs from rank 0 "
                                  "(a step that depends on timing, such as a latency-targeted cut, cannot run "
                                  "data-parallel)")

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order."""
        if not self.parallel:
            return [value]
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def sync(self, tensors: Sequence[Tensor]) -> None:
        """Copy rank 0's values into ``tensors`` on every rank (parameters, buffers), in place."""
        if not self.parallel or not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
        dist.broadcast(flat, src=0)
        offset = 0
        with torch.no_grad():
            for tensor in tensors:
                tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()

    def average_gradients(self, params: Sequence[Tensor], loss: Tensor) -> float:
        """Average the gradients of ``params`` and the ``loss`` over the ranks, in one all-reduce.

        Each rank's loss is the mean over its equal share of the global batch, so the mean
        over ranks is the global batch's loss and its gradient the single-process gradient.

        Returns:
            The global batch's loss (this rank's with one process).
        """
        if not self.parallel:
            return float(loss.detach())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([*(g.reshape(-1) for g in grads), loss.detach().reshape(1).to(grads[0].dtype if grads else torch.float32)])
        dist.all_reduce(flat)
        flat /= self.size
        offset = 0
        for param, grad in zip(params, grads, strict=True):
            averaged = flat[offset:offset + grad.numel()].view_as(grad)
            if param.grad is None:
                param.grad = averaged.clone()
            else:
                param.grad.copy_(averaged)
            offset += grad.numel()
        return float(flat[-1])


SINGLE = World()
"""One process: every collective is a no-op."""

_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def world_from_env(env: Mapping[str, str]) -> World:
    """The world torchrun describes in ``env`` (`SINGLE` without ``WORLD_SIZE``, or with 1).

    Raises:
        SpiralError: a variable is not a whole number, or the rank is out of range.
    """
    if "WORLD_SIZE" not in env:
        return SINGLE
    values = {}
    for name in _ENV:
        text = env.get(name, "0")
        try:
            values[name] = int(text)
        except ValueError:
            raise SpiralError(f"environment variable {name}={text!r} is not a whole number (set by torchrun)") from None
    size, rank, local = values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"]
    if size < 1 or not 0 <= rank < size or local < 0:
        raise SpiralError(f"torchrun environment is inconsistent: WORLD_SIZE={size}, RANK={rank}, LOCAL_RANK={local}")
    if size == 1:
        return SINGLE
    return World(size=size, rank=rank, local_rank=local, backend="gloo")


@contextmanager
def launched(env: Mapping[str, str] | None = None) -> Iterator[World]:
    """The world of this process, with its process group started for the block and ended after.

    Args:
        env: the environment to read (default ``os.environ``): torchrun's variables, plus
            ``MASTER_ADDR``/``MASTER_PORT`` that it sets for the rendezvous.
    """
    world = world_from_env(os.environ if env is None else env)
    if not world.parallel or dist.is_initialized():
        yield world
        return
    dist.init_process_group(backend=world.backend, rank=world.rank, world_size=world.size, timeout=TIMEOUT)
    try:
        yield world
    finally:
        dist.destroy_process_group()
