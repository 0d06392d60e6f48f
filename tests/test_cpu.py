"""cgl_train.cpu: the thread count a training process picks, and the allocator tuning."""
from __future__ import annotations

import platform
import resource

import pytest
import torch

from cgl_train.cpu import choose_threads, configure_cpu, keep_freed_memory, local_processes


def test_threads_never_exceed_torchs_count_nor_the_processes_share_of_the_cpus():
    assert choose_threads(1, environ={}, current=2, cpus=2) == 2
    assert choose_threads(1, environ={}, current=8, cpus=2) == 2  # affinity allows only 2
    assert choose_threads(2, environ={}, current=2, cpus=2) == 1  # two DDP ranks on 2 cpus
    assert choose_threads(4, environ={}, current=2, cpus=2) == 1  # never below 1
    assert choose_threads(1, environ={}, current=1, cpus=16) == 1  # a lower earlier setting stays


def test_an_explicit_thread_environment_is_respected():
    assert choose_threads(2, environ={"OMP_NUM_THREADS": "3"}, current=3, cpus=2) == 3
    assert choose_threads(2, environ={"MKL_NUM_THREADS": "1"}, current=1, cpus=16) == 1
    assert choose_threads(2, environ={"OMP_NUM_THREADS": " "}, current=2, cpus=2) == 1  # blank: not set


def test_local_processes_from_torchrun():
    assert local_processes({}) == 1
    assert local_processes({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert local_processes({"LOCAL_WORLD_SIZE": "x"}) == 1


def test_configure_cpu_sets_the_chosen_threads_and_keeps_the_allocator_tuned(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert configure_cpu(processes=1) == 1 == torch.get_num_threads()
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
        assert configure_cpu(processes=64) == 1  # a share of the cpus below 1 thread: 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_a_freed_large_block_is_reused_without_page_faults():
    assert keep_freed_memory() and keep_freed_memory()  # applied, idempotent

    def faults_of_a_64mib_tensor() -> int:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(1 << 24)  # 64 MiB, above glibc's default mmap threshold (32 MiB at most)
        assert x[-1].item() == 1.0
        del x
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

    for _ in range(12):  # the heap grows until freed blocks fit the next aligned request
        faults_of_a_64mib_tensor()
    # untuned, every allocation is a fresh mapping: 16384 faults of 4 KiB each time
    assert sum(faults_of_a_64mib_tensor() for _ in range(5)) < 1000
