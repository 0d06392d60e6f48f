"""Multi-process dissection under torchrun: shard images by rank, merge statistics exactly.

Every rank runs the same stages on a contiguous run of whole batches, then the
streaming statistics (dissect.stats classes) are merged: each rank gathers every
rank's state_dict and merges them in rank order, so all ranks hold identical
statistics (TopQuantile and TopImages merges are exact; tallies are int64 sums).
Only rank 0 writes outputs.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist

from dissect.stats import StreamingStat

__all__ = ["DistContext", "env_local_world_size", "env_world_size", "init_from_env", "shutdown", "shard_range", "merge_stats", "barrier"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job (dissections and training alike); world_size 1 is a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # init_from_env created the process group, so `shutdown` destroys it

    @property
    def active(self) -> bool:
        """True when several processes take part."""
        return self.world_size > 1

    @property
    def enabled(self) -> bool:
        """Same as `active` (the training code's word)."""
        return self.active

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes outputs and prints."""
        return self.rank == 0

    @property
    def local_processes(self) -> int:
        """This job's processes on this machine: torchrun's LOCAL_WORLD_SIZE, else all of them."""
        return (env_local_world_size() if self.active else None) or self.world_size


def env_local_world_size(environ: Mapping[str, str] | None = None) -> int | None:
    """torchrun's LOCAL_WORLD_SIZE (this job's processes on this machine), None where unset or not a count."""
    value = (os.environ if environ is None else environ).get("LOCAL_WORLD_SIZE", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def env_world_size() -> int:
    """WORLD_SIZE from the environment (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _local_rank(rank: int) -> int:
    return int(os.environ.get("LOCAL_RANK", rank))


def init_from_env(device: torch.device | None = None) -> DistContext:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, MASTER_ADDR...).

    Backend: nccl when `device` is CUDA, else gloo. Without WORLD_SIZE > 1 this is a single process.
    A group that already exists is joined as is (and left to its creator to destroy).
    """
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return DistContext(rank, dist.get_world_size(), _local_rank(rank))
    world = env_world_size()
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, init_method="env://")
    rank = dist.get_rank()
    log.info("joined process group: rank %d of %d (%s)", rank, dist.get_world_size(), backend)
    return DistContext(rank, dist.get_world_size(), _local_rank(rank), owns_group=True)


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group if `init_from_env` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def shard_range(n: int, rank: int, world_size: int, batch_size: int = 1) -> tuple[int, int]:
    """Contiguous [start, end) slice of n items for `rank`, cut at multiples of `batch_size`.

    Whole batches of the single-process batch grid go to each rank (counts differ by at most
    one batch), so every image is computed in the same batch as in one process: conv kernels
    may round differently for other batch compositions, and results must be identical.
    """
    batches = -(-n // batch_size)
    first, last = batches * rank // world_size, batches * (rank + 1) // world_size
    return min(n, first * batch_size), min(n, last * batch_size)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def merge_stats(stats: dict[str, StreamingStat], ctx: DistContext) -> dict[str, StreamingStat]:
    """Merge each named statistic over all ranks (in rank order); every rank gets the same result."""
    if not ctx.active:
        return stats
    local = {name: _to_cpu(s.state_dict()) for name, s in stats.items()}
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, local)
    merged: dict[str, StreamingStat] = {}
    for name, stat in stats.items():
        base = stat.empty_like()
        for r in range(ctx.world_size):
            base.merge_state(gathered[r][name])
        merged[name] = base
    return merged


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op for one process)."""
    if ctx.active:
        dist.barrier()
