"""Data-parallel training helpers: the same command runs alone or under ``torchrun``.

``torchrun --nproc_per_node N -m sppnet classify train ...`` starts N processes
with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
in their environment. :func:`init_distributed` reads them, joins the process
group (NCCL on CUDA, gloo on CPU) and picks the device (``cuda:LOCAL_RANK``).
Without those variables everything degrades to one process and no collective
call is made.

Sharding. :class:`ShardedBatchSampler` shuffles ``range(n)`` with a generator
seeded from ``(seed, epoch)``, cuts it into global batches of ``B``
(:func:`epoch_batches`: a last batch too small to train on joins the one before;
nothing is padded or dropped) and gives rank ``r`` the positions ``r, r + N,
r + 2N, ...`` of each, so local batch ``k`` of all ranks together is exactly
global batch ``k`` of a single process. Each rank's loss is the sum over its
samples times ``N / |global batch|``: DDP's gradient average is then the
single-process gradient of the same batch even where the ranks' shares differ by
one, which ``tests/test_distributed.py`` checks (with an odd number of samples).

Detection stages (proposals, conv5 caching, evaluation) split the images, not
batches: :func:`shard` gives each rank a fixed part of ``range(n)`` and
:func:`gather_shards` puts every rank's per-image results back in image order,
so the result is the one of a single process. Per-class work (SVMs, box
regressors) is split with :func:`split_classes`. :func:`fill_cache` fills a
per-image cache with each entry written by exactly one process::

    ctx = init_distributed(device)
    mine = shard(len(images), ctx)                          # contiguous block
    local = [detect(images[i]) for i in mine]               # per-image results (CPU objects)
    results = gather_shards(local, len(images), ctx)        # on every rank, in image order
    if ctx.is_main:
        write(results)

Everything here works, unchanged, with one process (``world_size == 1``) and
then makes no collective call.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from sppnet.engine.common import UserError, resolve_device

__all__ = [
    "CacheFill",
    "DistContext",
    "ShardedBatchSampler",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "derive_seed",
    "epoch_batches",
    "fill_cache",
    "gather_shards",
    "init_distributed",
    "shard",
    "shutdown_distributed",
    "split_classes",
    "wrap_model",
]

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
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
            raise UserError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
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


def epoch_batches(n: int, batch_size: int, world_size: int = 1) -> list[tuple[int, int]]:
    """The global batches of a training epoch, as ``(start, stop)`` positions in its order.

    Batches of ``batch_size``; a last partial batch too small to train on joins the
    one before it instead: one of fewer than half a batch, or of fewer than two
    samples per process (batch norm cannot normalise a single sample). Nothing is
    dropped and nothing is repeated, so every sample is seen once per epoch.

    Raises:
        ValueError: fewer than ``2 * world_size`` samples in all (then no batch gives
            every process two of them).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n < 2 * world_size:
        raise ValueError(
            f"{n} training sample(s) for {world_size} process(es): each process needs at least 2 per batch"
        )
    bounds = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if len(bounds) > 1:
        tail = bounds[-1][1] - bounds[-1][0]
        if 2 * tail < batch_size or tail < 2 * world_size:
            bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


class ShardedBatchSampler(Sampler[list[int]]):
    """This rank's local batches of one epoch (see the module docstring).

    The epoch's order is a permutation of ``range(n)`` seeded by ``(seed, epoch)``,
    cut into the global batches of :func:`epoch_batches`; rank ``r`` takes the
    positions ``r, r + N, ...`` of each. With a global batch divisible by ``N``
    every rank gets ``B / N`` samples; a longer last batch gives ranks one sample
    more or less, and :meth:`global_sizes` tells the training loop how to weigh
    them (sum of the losses times ``N / global size``), so the all-reduced gradient
    is the mean over the global batch whatever the split.

    Args:
        n: data set length.
        batch_size: the global batch size.
        seed, epoch: the permutation is a function of both only.
        rank, world_size: this process and the number of processes.
        start: skip this many batches (resuming mid-epoch).
    """

    def __init__(
        self, n: int, batch_size: int, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1, start: int = 0
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.n, self.batch_size, self.seed, self.epoch = int(n), int(batch_size), int(seed), int(epoch)
        self.rank, self.world_size, self.start = int(rank), int(world_size), int(start)
        self.bounds = epoch_batches(self.n, self.batch_size, self.world_size)[self.start :]

    def order(self) -> list[int]:
        """The global order of the epoch."""
        g = torch.Generator()
        g.manual_seed(derive_seed(self.seed, self.epoch, 0x5A))
        return torch.randperm(self.n, generator=g).tolist()

    def global_sizes(self) -> list[int]:
        """The global size of each batch this sampler yields, in order."""
        return [stop - begin for begin, stop in self.bounds]

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        for begin, stop in self.bounds:
            yield order[begin + self.rank : stop : self.world_size]

    def __len__(self) -> int:
        return len(self.bounds)


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


# --------------------------------------------------------------------------- #
# Per-image and per-class work (detection)
# --------------------------------------------------------------------------- #


def _shard_range(n: int, rank: int, world_size: int, strided: bool) -> range:
    if strided:
        return range(rank, n, world_size)
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def shard(n: int, ctx: DistContext, strided: bool = False) -> range:
    """This rank's part of ``range(n)``: every index on exactly one rank, the same on every call.

    Args:
        n: number of items (images, classes); ``n < world_size`` leaves some ranks empty.
        ctx: this process.
        strided: False (contiguous): rank ``r`` gets ``[r * n // N, (r + 1) * n // N)``,
            neighbouring images together (a video's frames, a sorted folder).
            True (strided): ``r, r + N, r + 2N, ...``, round robin, for items
            whose cost drifts with the index (classes sorted by frequency).
            Either way the parts differ in length by at most one.

    Returns:
        range: the indices, increasing.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"shard needs a count n >= 0, got {n!r}")
    return _shard_range(n, ctx.rank, ctx.world_size, strided)


def gather_shards(local: Sequence[T], n: int, ctx: DistContext, strided: bool = False) -> list[T]:
    """Every rank's results for its :func:`shard`, back in the order ``0..n-1``, on every rank.

    Args:
        local: this rank's results, one per index of ``shard(n, ctx, strided)``, in
            that order; picklable (move tensors to the CPU first).
        n, strided: as given to :func:`shard`.
        ctx: this process.

    Returns:
        list of ``n`` results; ``list(local)`` for one process.

    Raises:
        ValueError: ``local`` (or another rank's part) does not match its shard's length.
    """
    mine = shard(n, ctx, strided)
    if len(local) != len(mine):
        raise ValueError(f"rank {ctx.rank} has {len(local)} results for its {len(mine)} indices of {n}")
    parts = all_gather_objects(list(local), ctx)
    out: list[Any] = [None] * n
    for rank, part in enumerate(parts):
        indices = _shard_range(n, rank, ctx.world_size, strided)
        if len(part) != len(indices):
            raise ValueError(f"rank {rank} sent {len(part)} results for its {len(indices)} indices of {n}")
        for i, value in zip(indices, part):
            out[i] = value
    return out


def split_classes(num_classes: int, ctx: DistContext) -> range:
    """The classes this rank trains (SVMs, box regressors): ``shard(num_classes, ctx, strided=True)``.

    Collect the per-class results with ``gather_shards(results, num_classes, ctx, strided=True)``.
    """
    return shard(num_classes, ctx, strided=True)


@dataclass(frozen=True)
class CacheFill:
    """What :func:`fill_cache` did.

    Attributes:
        missing (int): distinct entries that were missing before the call (all ranks).
        built (int): entries this rank built.
        built_all (int): entries all ranks built together.
        stopped (bool): some rank stopped early (``should_stop``): entries are still missing.
    """

    missing: int
    built: int
    built_all: int
    stopped: bool


def fill_cache(
    keys: Sequence[str],
    exists: Callable[[int], bool],
    build: Callable[[int], None],
    ctx: DistContext,
    should_stop: Callable[[], bool] | None = None,
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
) -> CacheFill:
    """Builds the missing entries of a per-item cache, each entry by exactly one process.

    1. Rank 0 lists the distinct keys whose entry does not exist (the first item
       of each key stands for it) and sends the list to every rank, so all ranks
       agree on the work even while files appear.
    2. Each rank builds its strided share of that list (balanced to one entry).
    3. A sum over ranks of what each built, which no rank passes before all
       have finished: on return every entry built by any rank is on disk.

    ``build`` must write its entry atomically (``sppnet.utils.atomic_path`` /
    ``save_cache``): a run killed midway leaves whole entries or none, and the
    next call builds only what is missing (resume). Items with equal keys (two
    copies of one image) are built once.

    Args:
        keys: ``keys[i]`` names item ``i``'s entry (e.g. its content hash).
        exists: ``exists(i)`` tells whether item ``i``'s entry is present and valid
            (called on rank 0 only).
        build: ``build(i)`` computes and stores item ``i``'s entry.
        ctx: this process.
        should_stop: polled after each entry (e.g. a graceful-interrupt flag);
            True stops this rank; the others learn it at the end (``stopped``).
        progress: wraps this rank's iterable of indices (a progress bar; pass one
            on the main rank only).

    Returns:
        :class:`CacheFill`, the same ``missing``, ``built_all`` and ``stopped`` on every rank.
    """
    todo: list[int] | None = None
    if ctx.is_main:
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        todo = [i for i in first.values() if not exists(i)]
    todo = broadcast_object(todo, ctx)
    mine = todo[ctx.rank :: ctx.world_size]
    built, stopped = 0, False
    for i in progress(mine) if progress is not None else mine:
        build(i)
        built += 1
        if should_stop is not None and should_stop():
            stopped = True
            break
    totals = all_reduce_sum([built, float(stopped)], ctx)  # also the barrier of step 3
    return CacheFill(missing=len(todo), built=built, built_all=int(totals[0]), stopped=totals[1] > 0)
