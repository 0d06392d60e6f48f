"""torch.distributed plumbing for `cgl-train` under torchrun (env RANK / WORLD_SIZE).

One process per device; the global batch is split evenly across ranks, each
rank computes its losses on its share, DDP averages the gradients, and only
rank 0 writes logs and checkpoints. Backend: nccl on CUDA, gloo on CPU.

What is and is not equivalent to one process on the same global batch:
- L_task (a mean over the batch) and R_bn (a function of the weights) are, for
  models without BatchNorm: the average of the ranks' gradients is the
  single-process gradient (up to float summation order). tests/test_train_ddp.py
  checks this with lambda_g = lambda_s = 0. (With BatchNorm, e.g. AlexNet-B,
  no SyncBN is used: every layer normalises with per-rank batch statistics.)
- L_g and L_s are not. They use per-rank minibatch statistics, computed on each
  rank's share of the batch only: S, the per-channel std over the minibatch in
  psi's no-BN variant; the BN batch statistics behind the BN variant's tau; and
  the paper-form L_g, whose L1 norms run over the (local) minibatch and space
  before the ratio is taken. This is what the authors' code does, and what
  BatchNorm without SyncBN does. With lambda_g or lambda_s > 0, DDP training is
  equal to one process in expectation, not bit for bit. (The per-image L_g form
  splits exactly over images but still sees S or the BN statistics per rank.)
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from broden.errors import InputError
# one description of a process's place in a job, shared with `dissect run`
from dissect.distributed import DistContext, barrier, env_world_size, init_from_env, shutdown

__all__ = ["DistInfo", "env_world_size", "init_from_env", "shutdown", "per_rank_batch",
           "shard_indices", "all_reduce_sum", "all_reduce_min", "average_gradients", "wrap_ddp", "barrier"]

DistInfo = DistContext  # the training code's name for it


def per_rank_batch(global_batch: int, info: DistInfo) -> int:
    """Each rank's share of the global batch; it must divide evenly."""
    if global_batch % info.world_size:
        raise InputError(f"option batch_size = {global_batch} is the GLOBAL batch and must be "
                         f"divisible by the number of processes ({info.world_size})")
    return global_batch // info.world_size


def shard_indices(n: int, info: DistInfo) -> list[int]:
    """This rank's strided share of range(n), without padding (so every item counts once)."""
    return list(range(info.rank, n, info.world_size))


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum `t` over ranks in place (no-op for one process); returns `t`."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Minimum of `t` over ranks in place (no-op for one process); returns `t`."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def average_gradients(params: list[nn.Parameter], info: DistInfo) -> None:
    """Average the gradients of parameters DDP does not manage (e.g. learnable P1, P2)."""
    if not info.enabled:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(info.world_size)


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `model` when distributed; the model itself otherwise."""
    if not info.enabled:
        return model
    ids = [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)
