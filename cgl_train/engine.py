"""The training engine: L = L_task + lambda_bn R_bn + lambda_g L_g + lambda_s L_s (paper eq. 8).

`train(config)` runs a whole (resumable, optionally distributed) training and
writes `out/config.json`, `out/log.jsonl`, `out/latest.pth` and `out/best.pth`.
`build_trainer` + `train_step` are the same pieces one step at a time (the
overhead benchmark times them).

Choices (recorded in every checkpoint through the config):
- Weight decay applies to every parameter NOT covered by R_bn: with
  lambda_bn > 0 the grouped filters of the grouped convs get none (R_bn
  replaces it, eq. 6); their free filters, every bias, BN and the classifier get
  the usual coupled L2 decay. With lambda_bn = 0 every parameter decays (the
  baseline). P1, P2 (when learned) never decay.
- `block_norm_mode="proximal"` (`--prox`): R_bn is applied by a group soft-threshold after each optimizer step
  (threshold lr * lambda_bn) instead of through its gradient.
- Data order is a pure function of (seed, epoch) (DistributedSampler's
  permutation, also with one process). Each training sample's random
  augmentation is a pure function of (seed, epoch, sample index)
  (`SeededSamples`), whichever process loads it, so `workers` (and the
  number of DDP ranks) does not change the images. The main process's global
  torch RNG (dropout) is reseeded from (seed, epoch, rank) at each epoch and
  is not touched by data loading; the pair generator's state travels in the
  checkpoint. So `--resume` continues a run exactly (bit for bit on CPU).
- A dataset with a `batch(indices, device)` method (the synthetic shapes, held in
  memory as uint8, no augmentation) is served by `BatchLoader`: the sampler's
  indices, cut into batches, one index_select and normalisation each; no
  DataLoader, no workers (`workers` is then unused). The batches equal the
  DataLoader's bit for bit (tests/test_train.py).
- DataLoader workers (ImageFolder data, `workers` > 0) exit with the training process, also
  after a kill -9 of it (`exit_with_parent`, Linux; elsewhere torch's watchdog ends them).
- On the CPU, `train` picks the intra-op thread count and tunes the allocator
  once (cgl_train.cpu.configure_cpu: never more threads than torch's default or
  OMP_NUM_THREADS, split between the job's local processes).
- `--resume` may change only RESUME_MAY_DIFFER, and `epochs` only under a
  schedule that does not depend on it (config.check_resumable).
- log.jsonl: a first header line `{"header": true, "seed", "config",
  "cgl_options", "versions", "world_size", "data"}`, then one line per epoch
  (`read_log` splits them; TrainResult.history holds the epoch lines only).
- An improving epoch saves best.pth before latest.pth; `--resume` checks best.pth against
  latest.pth's record of it and restores or reports what a kill or a deletion left apart
  (`_reconcile_best`; docs/contracts.md, Checkpoints).
- A step whose loss terms (any computed, monitored ones included) or, without an enabled
  GradScaler, gradients are inf/NaN stops the run with NonFiniteTraining (cgl-train: exit 1)
  naming the epoch, the step and what was not finite. The flags stay on the device and are
  read once, at the epoch's end, before anything of the epoch is written. A GradScaler (AMP)
  still skips steps with inf/NaN gradients; those are not errors.
- Validation top-5 is null when the task has fewer than 5 classes.
- The logged `total` is eq. 8 (task + weighted terms, whatever way R_bn is
  applied); weight decay is not part of it.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import multiprocessing
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from broden.errors import InputError
from dissect.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from cgl_train.config import TrainConfig, check_resumable
from cgl_train.cpu import configure_cpu
from cgl_train.data import DataBundle, build_datasets
from cgl_train.distributed import (DistInfo, all_reduce_min, all_reduce_sum, average_gradients, barrier,
                                   init_from_env, per_rank_batch, shard_indices, shutdown, wrap_ddp)
from cgl_train.errors import NonFiniteTraining
from cgl_train.groups import GroupActivations, LayerGroups, layer_groups_config
from cgl_train.losses import CGLObjective
from cgl_train.models import build_model, default_group_layers
from dissect.devices import parse_device, resolve_device
from broden._fileio import write_json_atomic, write_text_atomic
from broden._progress import progress
from dissect.provenance import software_versions

__all__ = ["TrainResult", "Trainer", "Loaders", "BatchLoader", "StepMetrics", "SeededSamples", "sample_seed",
           "seed_worker", "exit_with_parent", "lr_at", "build_trainer", "build_loaders", "train_step",
           "train_one_epoch", "evaluate", "train", "save_untrained", "plateau_reached", "read_log", "log_header",
           "TERM_NAMES", "CHECKED", "NonFiniteTraining", "epoch_line", "val_text"]

log = logging.getLogger(__name__)

TERM_NAMES = ("task", "r_bn", "l_g", "l_s", "total")
# what each step checks for inf/NaN: the loss terms it computed, and the gradients it would apply
CHECKED = ("task", "r_bn", "l_g", "l_s", "gradients")


@dataclass
class StepMetrics:
    """Training metrics of one step, or summed over steps, as tensors on the training device.

    `terms`: each of TERM_NAMES -> float64 0-dim (NaN: not computed this step);
    `correct` (top-1 hits) and `count` (images): int64 0-dim; `nonfinite`: bool (len(CHECKED),),
    which of CHECKED were inf/NaN (None: not checked). Adding two needs no host sync.
    """

    terms: dict[str, torch.Tensor]
    correct: torch.Tensor
    count: torch.Tensor
    nonfinite: torch.Tensor | None = None

    def __add__(self, other: "StepMetrics") -> "StepMetrics":
        flags = (self.nonfinite if other.nonfinite is None else
                 other.nonfinite if self.nonfinite is None else self.nonfinite | other.nonfinite)
        return StepMetrics({k: v + other.terms[k] for k, v in self.terms.items()},
                           self.correct + other.correct, self.count + other.count, flags)

    @classmethod
    def zeros(cls, device: torch.device) -> "StepMetrics":
        """The sum of no steps."""
        zero = torch.zeros((), dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.int64, device=device)
        return cls({k: zero for k in TERM_NAMES}, count, count)


@dataclass
class TrainResult:
    """What `train` produced."""

    out: Path                      # the run directory
    latest: Path                   # out/latest.pth
    best: Path | None              # out/best.pth (None if never validated)
    metrics: dict[str, Any]        # the last epoch's log entry
    history: list[dict[str, Any]] = field(default_factory=list)  # every epoch's log entry
    epochs_completed: int = 0


@dataclass
class Trainer:
    """Everything one training step needs."""

    config: TrainConfig
    net: nn.Module                  # the bare model (checkpoints, hooks, evaluation)
    model: nn.Module                # `net`, DDP-wrapped when distributed (forward/backward)
    layer_groups: list[LayerGroups]
    objective: CGLObjective
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    dist: DistInfo
    use_amp: bool
    free_decay: list[tuple[nn.Parameter, int]]  # (grouped conv weight, first free channel): free filters still decay
    arch_kwargs: dict[str, Any]
    amp_dtype: torch.dtype = torch.float32  # autocast dtype when use_amp (amp_dtype_for)


def lr_at(config: TrainConfig, epoch: int) -> float:
    """Learning rate of 0-based `epoch` under the configured schedule."""
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))
    if config.lr_schedule == "step":
        return config.lr * config.lr_gamma ** (epoch // config.lr_step)
    return config.lr


def _param_groups(config: TrainConfig, net: nn.Module, layer_groups: list[LayerGroups],
                  objective: CGLObjective) -> tuple[list[dict[str, Any]], list[tuple[nn.Parameter, int]]]:
    modules = dict(net.named_modules())
    covered: list[nn.Parameter] = []
    free_decay: list[tuple[nn.Parameter, int]] = []
    if config.lambda_bn > 0:
        for lg in layer_groups:
            w = modules[lg.name].weight
            covered.append(w)
            if lg.spec.grouped < lg.spec.channels:
                free_decay.append((w, lg.spec.grouped))
    covered_ids = {id(p) for p in covered}
    decay = [p for p in net.parameters() if id(p) not in covered_ids]
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if covered:
        groups.append({"params": covered, "weight_decay": 0.0})
    scale_params = list(objective.parameters())
    if scale_params:
        groups.append({"params": scale_params, "weight_decay": 0.0})
    return groups, free_decay


def build_trainer(config: TrainConfig, num_classes: int, input_size: int, device: torch.device,
                  dist: DistInfo | None = None) -> Trainer:
    """Model (seeded init), grouped layers, CGL objective, SGD and grad scaler for `config`."""
    dist = dist or DistInfo()
    arch_kwargs = {**config.arch_kwargs, "num_classes": num_classes, "input_size": input_size}
    torch.manual_seed(config.seed)  # the same initial weights on every rank and every rerun
    net = build_model(config.arch, **arch_kwargs).to(device)
    layer_groups = default_group_layers(config.arch, net, groups=config.groups, layers=config.layers,
                                        group_overrides=config.group_overrides, free=config.free,
                                        free_overrides=config.free_overrides)
    objective = CGLObjective(net, layer_groups, config.cgl_options(), seed=config.seed,
                             monitor=config.monitor).to(device)
    groups, free_decay = _param_groups(config, net, layer_groups, objective)
    optimizer = torch.optim.SGD(groups, lr=lr_at(config, 0), momentum=config.momentum)
    amp_dtype = amp_dtype_for(device) if config.amp else None
    if config.amp and amp_dtype is None:
        log.warning("--amp: this %s has no native bfloat16; training in float32", device)
    use_amp = amp_dtype is not None
    # bfloat16 has float32's range: only float16 needs loss scaling
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    model = wrap_ddp(net, dist, device)
    return Trainer(config, net, model, layer_groups, objective, optimizer, scaler, device, dist, use_amp,
                   free_decay, arch_kwargs, amp_dtype or torch.float32)


def amp_dtype_for(device: torch.device) -> torch.dtype | None:
    """The autocast dtype of --amp on `device`: float16 on CUDA, bfloat16 on a CPU that has it natively."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None


def train_step(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor,
               acts: GroupActivations | None) -> StepMetrics:
    """One optimizer step on a batch; returns its metrics (terms not computed, lambda 0 and no monitoring: NaN).

    `acts` must wrap `trainer.net` when the objective needs activations.
    """
    cfg, opt = trainer.config, trainer.optimizer
    images = images.to(trainer.device, non_blocking=True)  # (N, 3, H, W)
    labels = labels.to(trainer.device, non_blocking=True)  # (N,)
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=trainer.device.type, dtype=trainer.amp_dtype, enabled=trainer.use_amp):
        logits = trainer.model(images)  # (N, K)
    task = F.cross_entropy(logits.float(), labels)
    # the CGL terms run outside autocast: the losses upcast half maps and reduce in float32
    terms = trainer.objective(acts.captured if acts is not None else {})
    loss = task + terms["total"]
    trainer.scaler.scale(loss).backward()
    if trainer.scaler.is_enabled():
        trainer.scaler.unscale_(opt)
    with torch.no_grad():
        for weight, start in trainer.free_decay:
            if weight.grad is not None:  # coupled L2 on the free filters, as SGD's weight_decay does
                weight.grad[start:].add_(weight[start:], alpha=cfg.weight_decay)
    average_gradients(list(trainer.objective.parameters()), trainer.dist)
    # an enabled scaler skips a step with inf/NaN gradients itself (not an error); without one
    # they would reach the weights
    grad_norm = None if trainer.scaler.is_enabled() else _max_abs_gradient(opt)
    scale = trainer.scaler.get_scale() if trainer.scaler.is_enabled() else None
    trainer.scaler.step(opt)
    trainer.scaler.update()
    # the scaler skips the step on inf/NaN gradients and then lowers its scale: the proximal
    # step belongs to the optimizer step, so it is skipped with it
    if scale is None or trainer.scaler.get_scale() >= scale:
        trainer.objective.proximal_step(opt.param_groups[0]["lr"])
    if acts is not None:
        acts.clear()
    return _step_metrics(trainer, task, terms, logits, labels, grad_norm)


@torch.no_grad()
def _max_abs_gradient(opt: torch.optim.Optimizer) -> torch.Tensor:
    """The largest |gradient| over the optimizer's parameters, on the device (inf/NaN if any is).

    The inf-norm, not the 2-norm: finite gradients never overflow it. One fused read, no sync.
    """
    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads, float("inf"))


@torch.no_grad()
def _step_metrics(trainer: Trainer, task: torch.Tensor, terms: dict[str, torch.Tensor], logits: torch.Tensor,
                  labels: torch.Tensor, grad_norm: torch.Tensor | None = None) -> StepMetrics:
    cfg = trainer.config
    nan = torch.full((), float("nan"), device=trainer.device, dtype=torch.float64)
    lam = {"r_bn": cfg.lambda_bn, "l_g": cfg.lambda_g, "l_s": cfg.lambda_s}
    values = {"task": task.detach().double()}
    total = values["task"]
    for name in ("r_bn", "l_g", "l_s"):
        values[name] = terms[name].detach().double() if name in terms else nan
        if lam[name] > 0:
            total = total + lam[name] * values[name]
    values["total"] = total  # eq. 8, in float64, whatever way R_bn is applied
    correct = (logits.argmax(dim=1) == labels).sum()  # int64
    count = torch.full((), labels.numel(), dtype=torch.int64, device=trainer.device)
    # terms not computed (NaN above) and unchecked gradients stand in as 0: finite
    zero = torch.zeros((), device=trainer.device, dtype=torch.float64)
    probe = torch.stack([values["task"], *(values[n] if n in terms else zero for n in ("r_bn", "l_g", "l_s")),
                         zero if grad_norm is None else grad_norm.double()])  # (len(CHECKED),)
    return StepMetrics(values, correct, count, ~torch.isfinite(probe))


def _bar_kwargs(trainer: Trainer, desc: str, total: int | None) -> dict[str, Any]:
    kw: dict[str, Any] = {"desc": desc, "total": total, "leave": False}
    if trainer.config.quiet or not trainer.dist.is_main:
        kw["disable"] = True
    return kw


def train_one_epoch(trainer: Trainer, loader: Iterable[Any], epoch: int) -> dict[str, Any]:
    """One pass over `loader` (at most max_train_batches); returns the epoch's mean terms and accuracy."""
    cfg = trainer.config
    lr = lr_at(cfg, epoch)
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr
    trainer.net.train()
    trainer.objective.train()
    limit = cfg.max_train_batches
    total = min(len(loader), limit) if limit else len(loader)  # type: ignore[arg-type]
    sums = StepMetrics.zeros(trainer.device)
    first_bad = _FirstNonFinite(trainer.device)
    batches = 0
    start = time.perf_counter()
    capture = (GroupActivations(trainer.net, trainer.layer_groups, copy=False)
               if trainer.objective.needs_activations() else contextlib.nullcontext())
    with capture as acts:
        bar = progress(loader, **_bar_kwargs(trainer, f"epoch {epoch + 1}/{cfg.epochs} train", total))
        for images, labels in bar:
            if limit is not None and batches >= limit:
                break
            step = train_step(trainer, images, labels, acts)
            first_bad.update(batches, step.nonfinite)
            sums = sums + step
            batches += 1
        bar.close()
    first_bad.check(epoch, batches, trainer.dist)
    return {**_epoch_means(sums, batches, trainer.dist), "lr": lr, "train_time": time.perf_counter() - start}


class _FirstNonFinite:
    """The first step of an epoch with an inf/NaN loss term or gradient, kept on the device.

    Updated every step without a host sync; `check` reads it once, at the epoch's end, before
    anything of the epoch is saved (so no weights updated from a non-finite step are written).
    """

    def __init__(self, device: torch.device) -> None:
        self.step = torch.full((), -1, dtype=torch.int64, device=device)  # -1: none yet
        self.flags = torch.zeros(len(CHECKED), dtype=torch.bool, device=device)

    def update(self, step: int, flags: torch.Tensor | None) -> None:
        """Record 0-based `step`'s flags (bool (len(CHECKED),)) if it is the first bad one."""
        if flags is None:
            return
        first = flags.any() & (self.step < 0)
        self.step = torch.where(first, step, self.step)
        self.flags = torch.where(first, flags, self.flags)

    def check(self, epoch: int, batches: int, dist: DistInfo) -> None:
        """Raise NonFiniteTraining naming 0-based `epoch`, the step and what was not finite (any rank)."""
        none = torch.iinfo(torch.int64).max
        step = torch.where(self.step < 0, none, self.step)
        flags = self.flags.long()
        # the first bad step over the ranks, and the flags of every rank's first bad step
        all_reduce_min(step, dist)
        all_reduce_sum(flags, dist)
        first, bad = int(step), [name for name, n in zip(CHECKED, flags.tolist()) if n]
        if first == none:
            return
        terms = [name for name in bad if name != "gradients"]
        what = [f"loss term{'s' if len(terms) > 1 else ''} {', '.join(terms)}"] if terms else []
        what += ["the gradients"] if "gradients" in bad else []
        raise NonFiniteTraining(f"training stopped at epoch {epoch + 1}, step {first + 1} of {batches}: not "
                                f"finite (inf or NaN): {' and '.join(what)} (a lower --lr? bad input data?)")


def _epoch_means(sums: StepMetrics, batches: int, dist: DistInfo) -> dict[str, Any]:
    """Per-step means of the terms and the top-1 accuracy, summed over DDP ranks (one host sync)."""
    terms = torch.stack([sums.terms[name] for name in TERM_NAMES])  # (5,) float64
    counts = torch.stack([sums.correct, sums.count,
                          torch.full_like(sums.count, batches)])  # (3,) int64: hits, images, batches
    all_reduce_sum(terms, dist)
    all_reduce_sum(counts, dist)
    values = terms.tolist()
    correct, count, steps = counts.tolist()
    result: dict[str, Any] = {name: (None if math.isnan(v) else v / max(steps, 1))
                              for name, v in zip(TERM_NAMES, values)}
    result["train_top1"] = correct / count if count else None
    return result


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Any], device: torch.device, num_classes: int,
             dist: DistInfo | None = None, max_batches: int | None = None,
             quiet: bool = True) -> dict[str, float | None]:
    """Top-1, top-5 (None when num_classes < 5) and mean cross-entropy, summed over DDP ranks."""
    dist = dist or DistInfo()
    model.eval()
    k = min(5, num_classes)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits
    count = torch.zeros(1, dtype=torch.int64, device=device)
    kw: dict[str, Any] = {"desc": "val", "leave": False}
    if quiet or not dist.is_main:
        kw["disable"] = True
    for b, (images, labels) in enumerate(progress(loader, **kw)):
        if max_batches is not None and b >= max_batches:
            break
        images, labels = images.to(device), labels.to(device)
        logits = model(images).float()  # (N, K)
        top = logits.topk(k, dim=1).indices  # (N, k)
        hits = top == labels[:, None]  # (N, k)
        sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums[1] += hits[:, 0].sum().double()
        sums[2] += hits.any(dim=1).sum().double()
        count += labels.numel()
    all_reduce_sum(sums, dist)
    all_reduce_sum(count, dist)
    n = int(count.item())
    if n == 0:
        return {"val_top1": None, "val_top5": None, "val_loss": None, "val_images": 0}
    loss, top1, top5 = (float(v) for v in sums.tolist())
    return {"val_top1": top1 / n, "val_top5": top5 / n if num_classes >= 5 else None,
            "val_loss": loss / n, "val_images": n}


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def val_text(metrics: dict[str, Any]) -> str:
    """`val top-1 51.4 %  top-5 88.0 %  val loss 0.930` from an epoch's metrics (top-5 only when measured)."""
    if metrics.get("val_top1") is None:
        return "no validation"
    parts = [f"val top-1 {_pct(metrics['val_top1'])}"]
    if metrics.get("val_top5") is not None:  # None below 5 classes: not a field worth printing
        parts.append(f"top-5 {_pct(metrics['val_top5'])}")
    if metrics.get("val_loss") is not None:
        parts.append(f"val loss {metrics['val_loss']:.3f}")
    return "  ".join(parts)


def epoch_line(entry: dict[str, Any], epochs: int) -> str:
    """The printed line of a log.jsonl epoch entry: `epoch 3/12  train loss 0.412  val top-1 51.4 %  ... (12.3 s)`."""
    parts = [f"epoch {entry['epoch']}/{epochs}"]
    if entry.get("total") is not None:
        loss = f"train loss {entry['total']:.3f}"
        if entry.get("task") is not None and entry["task"] != entry["total"]:  # CGL terms in the objective
            loss += f" (task {entry['task']:.3f})"
        parts.append(loss)
    if entry.get("train_top1") is not None:
        parts.append(f"train top-1 {_pct(entry['train_top1'])}")
    if entry.get("val_top1") is not None:
        parts.append(val_text(entry))
    if entry.get("time") is not None:
        parts.append(f"({entry['time']:.1f} s)")
    return "  ".join(parts)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_009 + rank) % (2 ** 63)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of training sample `index`'s random augmentation in 0-based `epoch`."""
    # an odd multiplier distinct from _epoch_seed's, so sample and epoch streams do not coincide
    return ((seed * 1_000_033 + epoch) * 2_147_483_659 + index) % (2 ** 63)


class SeededSamples(Dataset):
    """A dataset whose item i is drawn with torch, random and numpy seeded by (seed, epoch, i).

    Random transforms (torchvision's crops and flips use the global torch RNG)
    then give the same image whichever process loads item i and in whatever
    order, so the worker count cannot change a result. The caller's RNG states
    are restored after each item: loading in the main process (workers=0) does
    not disturb the dropout stream. Call `set_epoch` before iterating; workers
    receive the epoch when the loader starts them (non-persistent workers).
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use `epoch`'s seeds from now on."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        s = sample_seed(self.seed, self.epoch, int(index))
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            np.random.seed(s % (2 ** 32))
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: exit with the parent (`exit_with_parent`); seed random and numpy
    from the worker's torch seed.

    torch seeds each worker with base_seed + worker_id, base_seed drawn from the
    loader's generator; this makes anything a dataset draws outside
    SeededSamples reproducible too (per worker).
    """
    exit_with_parent()
    s = torch.initial_seed() % (2 ** 32)
    random.seed(s)
    np.random.seed(s)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_with_parent() -> None:
    """In a child process on Linux: have the kernel send SIGTERM when the parent dies (no-op elsewhere).

    DataLoader workers are daemonic, which ends them when the parent exits normally, and they
    poll for a dead parent only every few seconds (torch's watchdog): after a kill -9 of the
    run they outlived it by up to that long. The death signal ends them at once. (Linux sends it
    when the thread that started the worker ends: iterate loaders in a thread that lives as long.)
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):  # no prctl in this libc: keep torch's watchdog only
        return
    parent = multiprocessing.parent_process()
    if parent is not None and not parent.is_alive():  # it died before the signal was armed
        os._exit(1)


class BatchLoader:
    """Batches of an in-memory dataset in an index order: `dataset.batch(indices, device)` each, no workers.

    `order` is a sampler or a sequence of dataset indices, read afresh at every
    iteration (a DistributedSampler then gives its epoch's permutation); batches
    are consecutive `batch_size` runs of it, the last one shorter: what a
    DataLoader with that sampler and drop_last=False yields.
    """

    def __init__(self, dataset: Any, order: Iterable[int], batch_size: int,
                 device: torch.device | None = None) -> None:
        self.dataset = dataset
        self.order = order
        self.batch_size = int(batch_size)
        self.device = device

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = torch.as_tensor(list(self.order), dtype=torch.int64)  # (len,)
        for indices_batch in indices.split(self.batch_size):
            yield self.dataset.batch(indices_batch, self.device)


def _in_memory(dataset: Dataset) -> bool:
    """True for datasets that serve whole batches (a `batch(indices, device)` method, no augmentation)."""
    return callable(getattr(dataset, "batch", None))


@dataclass
class Loaders:
    """The training and validation loaders of one process, and what `set_epoch` reseeds."""

    train: DataLoader | BatchLoader
    val: DataLoader | BatchLoader
    sampler: DistributedSampler
    samples: SeededSamples
    generator: torch.Generator
    seed: int
    rank: int

    def set_epoch(self, epoch: int) -> None:
        """Data order, augmentation seeds and worker seeds of 0-based `epoch`."""
        self.sampler.set_epoch(epoch)
        self.samples.set_epoch(epoch)
        self.generator.manual_seed(_epoch_seed(self.seed, epoch, self.rank))


def build_loaders(config: TrainConfig, data: DataBundle, dist: DistInfo | None = None,
                  device: torch.device | None = None) -> Loaders:
    """Loaders whose batches depend on (seed, epoch, rank, world size) only, not on `workers`.

    In-memory datasets (see `_in_memory`) get BatchLoaders, which put their batches on `device`.
    """
    dist = dist or DistInfo()
    batch = per_rank_batch(config.batch_size, dist)
    samples = SeededSamples(data.train, config.seed)
    # with one process too, so the data order is the same function of (seed, epoch) as under DDP
    sampler = DistributedSampler(samples, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                 seed=config.seed, drop_last=False)
    # the loader draws its workers' base seed from this generator, not from the global RNG
    generator = torch.Generator().manual_seed(_epoch_seed(config.seed, 0, dist.rank))
    shard = shard_indices(len(data.val), dist)
    train_loader: DataLoader | BatchLoader
    val_loader: DataLoader | BatchLoader
    if _in_memory(data.train) and _in_memory(data.val):
        train_loader = BatchLoader(data.train, sampler, batch, device)
        val_loader = BatchLoader(data.val, shard, batch, device)
        return Loaders(train_loader, val_loader, sampler, samples, generator, config.seed, dist.rank)
    pin = device is not None and device.type == "cuda"
    train_loader = DataLoader(samples, batch_size=batch, sampler=sampler, num_workers=config.workers,
                              pin_memory=pin, drop_last=False, generator=generator,
                              worker_init_fn=seed_worker)
    val_loader = DataLoader(Subset(data.val, shard), batch_size=batch, shuffle=False,
                            num_workers=config.workers, pin_memory=pin,
                            generator=torch.Generator().manual_seed(config.seed), worker_init_fn=seed_worker)
    return Loaders(train_loader, val_loader, sampler, samples, generator, config.seed, dist.rank)


@dataclass
class _Best:
    """What latest.pth records of the best checkpoint: its val top-1 and epoch (None: none yet), and
    `missing` when best.pth was lost and is written again only at the next improvement."""

    top1: float | None = None
    epoch: int | None = None
    missing: bool = False


def _checkpoint(trainer: Trainer, data: DataBundle, epoch: int, metrics: dict[str, Any],
                history: list[dict[str, Any]], best: _Best) -> dict[str, Any]:
    cfg = trainer.config
    return make_checkpoint(
        arch=cfg.arch, arch_kwargs=trainer.arch_kwargs, state_dict=trainer.net.state_dict(),
        groups=layer_groups_config(trainer.layer_groups), normalization=data.normalization,
        input_size=data.input_size, train_options=cfg.to_dict(), metrics=metrics, epoch=epoch,
        seed=cfg.seed, optimizer=trainer.optimizer.state_dict(), scaler=trainer.scaler.state_dict(),
        objective={k: (v.detach().cpu() if torch.is_tensor(v) else v)
                   for k, v in trainer.objective.state_dict().items()},
        cgl_options=trainer.objective.options.to_dict(), history=history, best_top1=best.top1,
        best_epoch=best.epoch, best_missing=best.missing, class_names=data.class_names, data=data.info,
        world_size=trainer.dist.world_size, precision=precision(trainer))


def precision(trainer: Trainer) -> str:
    """The arithmetic the steps ran in: the autocast dtype under --amp (where the device has one), else float32.

    Recorded beside `amp`: on a CPU without native bfloat16, --amp trains in float32.
    """
    return str(trainer.amp_dtype).removeprefix("torch.") if trainer.use_amp else "float32"


def plateau_reached(history: list[dict[str, Any]], config: TrainConfig) -> bool:
    """The stopping rule: validation top-1 of the last `plateau_epochs` epochs spans less than
    `plateau_delta` and the last one reached `plateau_min_top1` (off when plateau_epochs is 0)."""
    n = config.plateau_epochs
    if n < 1 or len(history) < n:
        return False
    recent = [h.get("val_top1") for h in history[-n:]]
    if any(v is None for v in recent):
        return False
    if config.plateau_min_top1 is not None and recent[-1] < config.plateau_min_top1:
        return False
    return max(recent) - min(recent) < config.plateau_delta


def _check_resumable(ckpt: dict[str, Any], config: TrainConfig, path: Path) -> None:
    check_resumable(dict(ckpt.get("train_options") or {}), config, str(path))
    if (ckpt.get("metrics") or {}).get("stopped"):
        raise InputError(f"{path}: the run stopped at epoch {ckpt['epoch']} by its plateau rule "
                         f"(--plateau-epochs); nothing to resume")
    done = int(ckpt["epoch"])
    if done >= config.epochs:
        raise InputError(f"{path}: the run already completed {done} epoch(s) and epochs = {config.epochs}; "
                         f"nothing to resume (pass --epochs > {done} to extend a 'step' or 'constant' run)")


def _recorded_best(ckpt: dict[str, Any]) -> _Best:
    """The best checkpoint a latest.pth records."""
    top1 = ckpt.get("best_top1")
    epoch = ckpt.get("best_epoch")
    if top1 is not None and epoch is None:  # written before best_epoch: the first epoch reaching it
        epoch = next((h.get("epoch") for h in ckpt.get("history", []) if h.get("val_top1") == top1), None)
    return _Best(top1, epoch, bool(ckpt.get("best_missing")))


def _best_on_disk(best_path: Path) -> tuple[int | None, float | None] | str | None:
    """(epoch, val top-1) of best.pth, None when there is none, or why it cannot be read."""
    if not best_path.exists():
        return None
    try:
        ckpt = load_checkpoint(best_path)
    except InputError as e:
        return f"cannot be read ({e})"
    return ckpt.get("epoch"), (ckpt.get("metrics") or {}).get("val_top1")


def _set_aside(best_path: Path) -> Path:
    """Move a best.pth that is not the recorded best out of the way (kept: it may be worth a look)."""
    stale = best_path.with_name("best.stale.pth")
    best_path.replace(stale)
    return stale


def _reconcile_best(ckpt: dict[str, Any] | None, latest: Path, best_path: Path) -> _Best:
    """Make best.pth agree with what latest.pth (`ckpt`; None for a new run) records, saying what differs.

    A kill between the two saves of an epoch, or a deleted file, leaves them apart. A best.pth
    that is not the recorded one is moved to best.stale.pth; a missing best that is latest.pth's
    own epoch is rewritten from it; any other is lost: the returned record says so (`missing`)
    and best.pth is written again at the next improvement.
    """
    best = _recorded_best(ckpt) if ckpt is not None else _Best()
    found = _best_on_disk(best_path)
    if found == ((best.epoch, best.top1) if best.top1 is not None else None):
        return _Best(best.top1, best.epoch, False)
    if found is None:
        what = f"{best_path} is missing"
    else:
        held = found if isinstance(found, str) else f"holds epoch {found[0]} (val top-1 {found[1]})"
        what = f"{best_path} {held}, which is not the best checkpoint {latest} records: moved it to " \
               f"{_set_aside(best_path).name}"
    if best.top1 is None:
        log.warning("%s (%s)", what, "it records none yet" if ckpt is not None else "there is no latest.pth")
        return best
    recorded = f"{latest.name} records epoch {best.epoch} (val top-1 {best.top1}) as the best"
    if ckpt is not None and best.epoch == ckpt["epoch"]:
        save_checkpoint(ckpt, best_path)  # latest.pth is that epoch's checkpoint
        log.warning("%s; %s, its own epoch: restored best.pth from latest.pth", what, recorded)
        return _Best(best.top1, best.epoch, False)
    log.warning("%s; %s and no copy of that checkpoint is left: best.pth is written again when validation "
                "top-1 exceeds %s (latest.pth records best_missing until then)", what, recorded, best.top1)
    return _Best(best.top1, best.epoch, True)


def log_header(trainer: Trainer, data: DataBundle) -> dict[str, Any]:
    """The first line of log.jsonl: what produced the epoch lines below it."""
    cfg = trainer.config
    return {"header": True, "format": "cgl-train-log", "version": 1, "seed": cfg.seed,
            "config": cfg.to_dict(), "cgl_options": trainer.objective.options.to_dict(),
            "versions": software_versions(), "world_size": trainer.dist.world_size, "data": dict(data.info),
            "precision": precision(trainer),
            # intra-op threads change float sums (convolution backward): a rerun must use as many
            "torch_threads": torch.get_num_threads()}


def _write_log(out: Path, header: dict[str, Any], history: list[dict[str, Any]]) -> None:
    write_text_atomic(out / "log.jsonl", "".join(json.dumps(h) + "\n" for h in [header, *history]))


def read_log(path: str | Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(header or None, epoch entries) of a log.jsonl; InputError names a malformed line."""
    path = Path(path)
    header: dict[str, Any] | None = None
    entries: list[dict[str, Any]] = []
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise InputError(f"{path}: cannot read training log: {e}") from e
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: line {number} is not JSON: {e}") from e
        if not isinstance(record, dict):
            raise InputError(f"{path}: line {number}: expected a JSON object")
        if record.get("header"):
            header = record
        else:
            entries.append(record)
    return header, entries


def save_untrained(config: TrainConfig) -> Path:
    """The untrained control: out/latest.pth holding the network exactly as `train` would start it
    (the seeded initial weights), at epoch 0, with its validation metrics. Returns the path."""
    config.validate()
    out = Path(config.out)
    with _out_lock(out):
        return _save_untrained_locked(config, out)


def _save_untrained_locked(config: TrainConfig, out: Path) -> Path:
    device = resolve_device(config.device)
    if device.type == "cpu":
        configure_cpu()
    data = build_datasets(config, progress=not config.quiet)
    trainer = build_trainer(config, data.num_classes, data.input_size, device)
    loaders = build_loaders(config, data, DistInfo(), device)
    metrics = evaluate(trainer.net, loaders.val, device, data.num_classes, max_batches=config.max_val_batches)
    write_json_atomic(out / "config.json", config.to_dict())
    path = out / "latest.pth"
    save_checkpoint(_checkpoint(trainer, data, 0, {**metrics, "untrained": True}, [], _Best()), path)
    return path


def train(config: TrainConfig) -> TrainResult:
    """Train `config` end to end (resuming from out/latest.pth with config.resume); see the module doc."""
    config.validate()
    out = Path(config.out)
    # one run per --out: a second one would interleave checkpoints and logs (rank 0 locks, as it writes)
    with _out_lock(out):
        return _train_locked(config, out)


def _out_lock(out: Path) -> Any:
    from broden._locks import locked_directory

    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return locked_directory(out, "cgl-train", option="--out")


def _train_locked(config: TrainConfig, out: Path) -> TrainResult:
    latest, best_path = out / "latest.pth", out / "best.pth"
    if not config.resume and latest.exists():
        raise InputError(f"--out {out} already holds a run ({latest}); pass --resume to continue it "
                         f"or choose another --out")
    if config.resume and not latest.is_file():
        raise InputError(f"--resume: no checkpoint to resume at {latest}")
    dist = init_from_env(parse_device(config.device))
    try:
        device = resolve_device(config.device, dist.local_rank if dist.enabled else 0)
        if device.type == "cpu":
            configure_cpu()
        return _train(config, out, latest, best_path, device, dist)
    finally:
        shutdown(dist)


def _train(config: TrainConfig, out: Path, latest: Path, best_path: Path, device: torch.device,
           dist: DistInfo) -> TrainResult:
    show = not config.quiet and dist.is_main
    if dist.is_main:  # rank 0 generates the synthetic set; the others wait and reuse it
        data = build_datasets(config, progress=show)
    barrier(dist)
    if not dist.is_main:
        data = build_datasets(config, progress=False)
    trainer = build_trainer(config, data.num_classes, data.input_size, device, dist)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    ckpt = None
    if config.resume:
        ckpt = load_checkpoint(latest)
        _check_resumable(ckpt, config, latest)
        trainer.net.load_state_dict(ckpt["state_dict"])
        trainer.optimizer.load_state_dict(ckpt["optimizer"])
        trainer.objective.load_state_dict(ckpt["objective"])
        if ckpt.get("scaler"):
            trainer.scaler.load_state_dict(ckpt["scaler"])
        history = list(ckpt.get("history", []))
        start_epoch = int(ckpt["epoch"])
        log.info("resuming %s at epoch %d", latest, start_epoch)
    # only rank 0 writes checkpoints, so only it looks at best.pth
    best = _reconcile_best(ckpt, latest, best_path) if dist.is_main else _recorded_best(ckpt or {})
    if dist.is_main:
        write_json_atomic(out / "config.json", config.to_dict())
    header = log_header(trainer, data)
    loaders = build_loaders(config, data, dist, device)
    for epoch in range(start_epoch, config.epochs):
        loaders.set_epoch(epoch)
        torch.manual_seed(_epoch_seed(config.seed, epoch, dist.rank))
        entry: dict[str, Any] = {"epoch": epoch + 1}
        try:
            entry.update(train_one_epoch(trainer, loaders.train, epoch))
        except NonFiniteTraining as e:  # raised before anything of this epoch is written
            kept = f"{latest} still holds epoch {epoch}" if epoch else "no checkpoint was written"
            raise NonFiniteTraining(f"{e}; nothing was saved for epoch {epoch + 1}: {kept}") from None
        last = epoch + 1 == config.epochs
        val: dict[str, Any] = {"val_top1": None, "val_top5": None, "val_loss": None}
        if last or (epoch + 1) % config.val_every == 0:
            val = evaluate(trainer.net, loaders.val, device, data.num_classes, dist,
                           config.max_val_batches, quiet=not show)
        entry.update(val)
        entry["p1"] = float(trainer.objective.scale.p1.detach())
        entry["p2"] = float(trainer.objective.scale.p2.detach())
        entry["relevance"] = trainer.objective.relevances()
        entry["time"] = entry.pop("train_time")
        history.append(entry)
        improved = entry["val_top1"] is not None and (best.top1 is None or entry["val_top1"] > best.top1)
        if improved:
            best = _Best(entry["val_top1"], epoch + 1)
        metrics = {k: entry.get(k) for k in ("val_top1", "val_top5", "val_loss", "train_top1")}
        metrics["train_loss"] = entry["total"]
        metrics["train_task_loss"] = entry["task"]
        stop = plateau_reached(history, config)
        if stop:
            metrics["stopped"] = "plateau"  # recorded: a resume must not continue a finished run
        if dist.is_main:
            ckpt = _checkpoint(trainer, data, epoch + 1, metrics, history, best)
            if improved:  # first: a kill between the two saves leaves no latest.pth naming an absent best
                save_checkpoint(ckpt, best_path)
            save_checkpoint(ckpt, latest)
            _write_log(out, header, history)  # last: the log never lists an epoch no checkpoint holds
            log.info("%s", epoch_line(entry, config.epochs))
        barrier(dist)
        if stop:
            log.info("validation top-1 plateaued after epoch %d: stopping", epoch + 1)
            break
    return TrainResult(out=out, latest=latest, best=best_path if best_path.exists() else None,
                       metrics=history[-1] if history else {}, history=history,
                       epochs_completed=len(history))
