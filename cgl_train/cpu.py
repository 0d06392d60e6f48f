"""CPU settings a training process chooses once: intra-op threads and the allocator.

Threads (`choose_threads`): an explicit OMP_NUM_THREADS / MKL_NUM_THREADS is
kept as torch applied it. Otherwise never more than torch already uses (its
default is the number of physical cores; an earlier torch.set_num_threads lower
than that is kept) and never more than this process's share of the CPUs it may
run on (sched_getaffinity): with several processes of one job on a machine
(torchrun's LOCAL_WORLD_SIZE, DDP on CPU), cpus // local processes each. The choice is a function of the
environment only, never of the machine's load, because the thread count changes
float results (mkldnn convolutions sum in another order): a rerun with the same
settings is bit for bit the same. On a CPU shared with other busy processes, one
thread per process (OMP_NUM_THREADS=1) is usually faster; see
benchmarks/cpu_step.py.

Allocator (`keep_freed_memory`): glibc returns every block above its mmap
threshold (at most 32 MiB by default) to the kernel on free, so each training
step maps fresh pages for every large activation and pays a page fault per 4 KiB
on first touch: measured about 40% of a tiny-CNN step at batch 32 on CPU. Raising
the mmap and trim thresholds keeps freed blocks in the heap for reuse, as a
caching allocator would. It changes no value; the heap settles after a few steps
(measured: tiny CNN + CGL at batch 32, peak RSS 1.47 GB instead of 1.38 GB, no
page faults per step instead of about 345,000). Other C libraries: a no-op.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform

import torch

from dissect.distributed import env_local_world_size

__all__ = ["THREAD_ENV", "usable_cpus", "local_processes", "choose_threads", "keep_freed_memory",
           "configure_cpu"]

log = logging.getLogger(__name__)

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 1 << 30  # blocks up to 1 GiB come from the heap, which keeps up to 1 GiB free at its top
_allocator_tuned = False


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def local_processes(environ: dict[str, str] | None = None) -> int:
    """Processes of this job on this machine: torchrun's LOCAL_WORLD_SIZE, else 1."""
    return env_local_world_size(environ) or 1


def choose_threads(local_processes: int = 1, environ: dict[str, str] | None = None,
                   current: int | None = None, cpus: int | None = None) -> int:
    """The intra-op thread count for one of `local_processes` processes on this machine (see the module doc)."""
    environ = os.environ if environ is None else environ
    current = torch.get_num_threads() if current is None else current
    if any(environ.get(name, "").strip() for name in THREAD_ENV):
        return current  # the user's explicit choice
    share = max(1, (usable_cpus() if cpus is None else cpus) // max(1, local_processes))
    return max(1, min(current, share))


def keep_freed_memory() -> bool:
    """Tune glibc malloc to keep large freed blocks for reuse (see the module doc); True if applied."""
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES) == 1
    except (OSError, AttributeError):
        return False
    _allocator_tuned = ok
    log.debug("glibc mallopt: large freed blocks kept for reuse: %s", ok)
    return ok


def configure_cpu(processes: int | None = None) -> int:
    """Apply `choose_threads` and `keep_freed_memory` for a process training on the CPU; returns the threads.

    `processes`: this job's processes on this machine (default `local_processes()`).
    """
    threads = choose_threads(local_processes() if processes is None else processes)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    keep_freed_memory()
    log.info("CPU training: %d intra-op thread(s)", threads)
    return threads
