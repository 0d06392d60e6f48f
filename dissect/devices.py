"""Choose the torch device once, at the edge (`--device auto|cpu|cuda|cuda:N`)."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from broden.errors import InputError

__all__ = ["parse_device", "resolve_device", "float32_math", "available_memory", "activation_budget_mb",
           "FALLBACK_BUDGET_MB"]

FALLBACK_BUDGET_MB = 2048  # kept activations when the free memory cannot be read


def parse_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else is parsed by torch and checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise InputError(f"--device {name!r}: not a device name (expected auto, cpu, cuda, cuda:N)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """The device this process computes on: parse_device, and a CUDA device without an index is
    this process's GPU (`local_rank`, else LOCAL_RANK under torchrun, else 0), made current."""
    device = parse_device(name)
    if device.type == "cuda":
        if device.index is None:
            rank = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", "0"))
            device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def float32_math(device: torch.device, allow_tf32: bool = False) -> Iterator[None]:
    """Within: CUDA convolutions and matmuls in IEEE float32 (TF32 only when `allow_tf32`); restored after.

    cuDNN allows TF32 convolutions by default on Ampere and later, which moves activations, hence
    thresholds and masks, away from the CPU's. A no-op off CUDA.
    """
    if device.type != "cuda":
        yield
        return
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.set_float32_matmul_precision("high" if allow_tf32 else "highest")
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = conv
        torch.set_float32_matmul_precision(matmul)


def available_memory(device: torch.device, meminfo: str = "/proc/meminfo") -> int | None:
    """Bytes free for new tensors on `device` now: CUDA's free memory, else the OS's MemAvailable; None unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        pass
    try:  # other Unixes: free pages (less than MemAvailable: the page cache counts as used)
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def activation_budget_mb(given: int | None, device: torch.device, processes: int = 1) -> int:
    """`--activation-budget-mb` as used: the given MiB, else half the memory free now, shared by this
    machine's `processes` (torchrun's ranks), else FALLBACK_BUDGET_MB when that cannot be read."""
    if given is not None:
        return int(given)
    free = available_memory(device)
    if free is None:
        return FALLBACK_BUDGET_MB
    return int(free // 2 // max(1, processes) // 2 ** 20)
