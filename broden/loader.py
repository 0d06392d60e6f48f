"""Loading that runs ahead of compute: worker threads, bounded look-ahead, results in order.

Decoding (Pillow) and reading (numpy copies out of memory maps) release the GIL,
so a few threads keep batches ready while the main thread computes. Results come
back in the order of the items whatever thread finished first, so what the
consumer sees is exactly what a plain loop would give.

Thread budget: the cores this process may run on (os.sched_getaffinity), as
far as other processes leave them idle, are shared by torch's intra-op threads
and the loader threads. `thread_plan` picks both (see its docstring);
`torch_threads` sets torch's count for a block and puts the previous one back.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch

__all__ = ["available_cores", "idle_fraction", "thread_plan", "torch_threads", "Prefetcher", "iter_batches", "pin"]

T = TypeVar("T")
R = TypeVar("R")


def available_cores() -> int:
    """The number of CPUs this process may run on (its affinity mask; cpu_count where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


_IDLE_SAMPLE: tuple[float, float] | None = None  # (monotonic time, idle fraction) of the last sample


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields[:8])


def idle_fraction(sample_s: float = 0.1) -> float:
    """Share of the machine's CPU time left idle over a short sample (1.0 where it cannot be measured).

    Reused for a few seconds, so back-to-back runs do not each pay the sample.
    """
    global _IDLE_SAMPLE
    now = time.monotonic()
    if _IDLE_SAMPLE is not None and now - _IDLE_SAMPLE[0] < 5.0:
        return _IDLE_SAMPLE[1]
    a = _cpu_times()
    time.sleep(sample_s)
    b = _cpu_times()
    frac = 1.0
    if a is not None and b is not None and b[1] > a[1]:
        frac = min(1.0, max(0.0, (b[0] - a[0]) / (b[1] - a[1])))
    _IDLE_SAMPLE = (time.monotonic(), frac)
    return frac


def thread_plan(threads: int = 0, loader_threads: int = 0, device: str | torch.device = "cpu",
                cores: int | None = None, idle: float | None = None, processes: int = 1) -> tuple[int, int]:
    """(torch intra-op threads, loader threads); 0 means "choose" for either.

    `processes`: this job's processes on this machine; each plans with its share
    of the cores (several ranks each taking all cores slow each other down).

    On CPU the model is the work: torch gets the cores this process may use
    (os.sched_getaffinity) that are idle now (`idle`: fraction, default sampled
    from /proc/stat), at least one. Threads beyond the idle cores do not add
    speed on a shared machine, they take it away: every parallel region then
    waits for a thread the scheduler has put aside (measured here: 2 threads
    under a load of 2 other processes on 2 cores ran 2-3x slower than 1). One
    loader thread per 4 cores (at least one) reads ahead: a warm cache costs it
    a memory copy per batch, a cold pass the decoding, a small share of
    AlexNet's forward time per image. On a GPU the CPU's work is the loading:
    up to 8 loader threads, one core left to drive the device, few torch threads.
    """
    cores = available_cores() if cores is None else max(1, int(cores))
    cores = max(1, cores // max(1, int(processes)))
    kind = torch.device(device).type if not isinstance(device, torch.device) else device.type
    if kind == "cpu":
        auto_loader = max(1, cores // 4)
        auto_torch = cores
        if not threads:  # sampled only when it decides something
            free = idle if idle is not None else idle_fraction()
            auto_torch = max(1, min(cores, int(round(free * cores))))
    else:
        auto_loader = max(1, min(8, cores - 1))
        auto_torch = max(1, min(4, cores - auto_loader))
    return (int(threads) or auto_torch), (int(loader_threads) or auto_loader)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch intra-op threads; the previous count comes back after."""
    before = torch.get_num_threads()
    if n and n != before:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class Prefetcher(Iterator[R]):
    """`fn(item)` for each item, in order, computed ahead by `threads` worker threads.

    At most `depth` results (default threads + 1) are in flight or waiting, so
    memory stays bounded. An exception raised by `fn` comes out where its item
    would have, after the items before it; the queued work is then cancelled.
    `threads=0` computes each item in the caller's thread when it is asked for.
    Use as a context manager (or call `close`) when the loop may stop early.
    `waited` counts the seconds the caller spent in `next` (waiting for results
    not ready yet, handing out work; all of `fn`'s time with threads=0): the
    time loading held it up.
    """

    def __init__(self, fn: Callable[[T], R], items: Iterable[T], threads: int = 1, depth: int | None = None):
        self._fn = fn
        self._items = iter(items)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="loader") if threads > 0 else None
        self._depth = max(1, depth if depth is not None else threads + 1)
        self._pending: deque[Future] = deque()
        self._closed = False
        self.waited = 0.0

    def _fill(self) -> None:
        while len(self._pending) < self._depth:
            try:
                item = next(self._items)
            except StopIteration:
                return
            self._pending.append(self._pool.submit(self._fn, item))  # type: ignore[union-attr]

    def __next__(self) -> R:
        t = time.perf_counter()  # all of the call: handing work to the threads holds the caller up too
        try:
            return self._next()
        finally:
            self.waited += time.perf_counter() - t

    def _next(self) -> R:
        if self._closed:
            raise StopIteration
        if self._pool is None:
            try:
                item = next(self._items)
            except StopIteration:
                self.close()
                raise
            return self._fn(item)
        self._fill()
        if not self._pending:
            self.close()
            raise StopIteration
        try:
            result = self._pending.popleft().result()
        except BaseException:
            self.close()
            raise
        self._fill()  # the next one starts before the caller works on this one
        return result

    def close(self) -> None:
        """Cancel what has not started and wait for what has (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for f in self._pending:
            f.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "Prefetcher[R]":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # a loop abandoned without close must not leave threads behind
        try:
            self.close()
        except Exception:
            pass


def pin(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch's tensors in page-locked memory (fast, asynchronous copies to a CUDA device)."""
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def iter_batches(dataset: Any, ranges: Sequence[tuple[int, int]], threads: int = 1,
                 pin_memory: bool = False, depth: int | None = None) -> Prefetcher[tuple[int, dict[str, Any]]]:
    """(start, dataset.get_batch(range(start, stop))) for each (start, stop), read ahead by worker threads.

    Each batch is a function of its indices only, so the contents and order equal
    a plain loop's. `pin_memory` (CUDA devices) pins each batch in its worker.
    """
    def load(r: tuple[int, int]) -> tuple[int, dict[str, Any]]:
        batch = dataset.get_batch(np.arange(r[0], r[1]))
        return r[0], (pin(batch) if pin_memory else batch)

    return Prefetcher(load, list(ranges), threads=threads, depth=depth)
