"""Data-parallel training helpers: the same command runs alone or under ``torchrun``.

``torchrun --nproc_per_node N -m sppnet classify train ...`` starts N processes
with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
in their environment. :func:`init_distributed` reads them, joins the process
group (NCCL on CUDA, gloo on CPU) and picks the device (``cuda:LOCAL_RANK``).
Without those variables everything degrades to one process and no collective
call is made.

Sharding. :class:`ShardedEpochSampler` shuffles ``range(n)`` with a generator
seeded from ``(seed, epoch)``, pads it to a multiple of the world size with its
own first indices (as ``DistributedSampler``) and gives rank ``r`` the positions
``r, r + N, r + 2N, ...``. With a global batch ``B`` and local batches ``B / N``,
local batch ``k`` of all ranks together is exactly global batch ``k`` of a
single process: DDP's gradient average then equals the single-process gradient
of the same batch (equal local batch sizes), which ``tests/test_distributed.py``
checks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from sppnet.engine.common import UserError, resolve_device

__all__ = [
    "DistContext",
    "init_distributed",
    "shutdown_distributed",
    "ShardedEpochSampler",
    "derive_seed",
    "wrap_model",
    "all_reduce_sum",
    "all_gather_objects",
    "broadcast_object",
    "barrier",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group (a single process)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and prints."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Joins the ``torchrun`` process group if the environment describes one.

    Args:
        device: ``auto | cpu | cuda | cuda:N``; under ``torchrun`` with CUDA each
            process takes ``cuda:LOCAL_RANK``.
        timeout_s: collective-call timeout.

    Returns:
        The :class:`DistContext`; ``world_size == 1`` without ``torchrun``.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device)
    if world <= 1:
        return DistContext(device=dev)
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
    if dev.type == "cuda":
        if torch.cuda.device_count() <= local_rank:
            raise UserError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend)


def shutdown_distributed(ctx: DistContext) -> None:
    """Leaves the process group (no-op for a single process)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def derive_seed(*key: int) -> int:
    """A 63-bit seed from integers (numpy's ``SeedSequence``: well mixed, stable across platforms)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in key]).generate_state(2, np.uint64)[0] >> 1)


class ShardedEpochSampler(Sampler[int]):
    """This rank's share of one epoch's shuffled order (see the module docstring).

    Args:
        n: data set length.
        seed, epoch: the permutation is a function of both only.
        rank, world_size: this process and the number of processes.
        shuffle: False keeps ``0..n-1`` (evaluation).
        start: skip this many of THIS rank's indices (resuming mid-epoch).
        pad: pad to a multiple of ``world_size`` (training); False gives ranks
            up to one index less (evaluation: every sample counted once).
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        start: int = 0,
        pad: bool = True,
    ) -> None:
        if n < 1:
            raise ValueError(f"cannot sample from an empty data set (n={n})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.n, self.seed, self.epoch = int(n), int(seed), int(epoch)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle, self.start, self.pad = bool(shuffle), int(start), bool(pad)

    def order(self) -> list[int]:
        """The global order of the epoch (padded when ``pad``)."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(derive_seed(self.seed, self.epoch, 0x5A))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.pad:
            total = -(-self.n // self.world_size) * self.world_size
            while len(order) < total:
                order += order[: total - len(order)]
        return order

    def __iter__(self) -> Iterator[int]:
        mine = self.order()[self.rank :: self.world_size]
        return iter(mine[self.start :])

    def __len__(self) -> int:
        total = -(-self.n // self.world_size) * self.world_size if self.pad else self.n
        mine = len(range(self.rank, total, self.world_size))
        return max(0, mine - self.start)


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` when distributed, else ``model``."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def all_reduce_sum(values: Sequence[float], ctx: DistContext) -> list[float]:
    """Sums numbers over all ranks (float64); identity for one process."""
    if not ctx.distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """``[obj_of_rank_0, obj_of_rank_1, ...]`` on every rank (picklable objects of our own)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def _comm_device(ctx: DistContext) -> torch.device:
    return ctx.device if ctx.backend == "nccl" else torch.device("cpu")
