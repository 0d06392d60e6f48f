"""`dissect run` in 2 processes (gloo, 127.0.0.1) writes exactly what one process writes."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from dissect.checkpoint import make_checkpoint, save_checkpoint
from dissect.cli import main
from dissect.distributed import shard_range
from dissect.results import LAYER_FILES
from test_pipeline import make_concept_broden

FILES = LAYER_FILES


def make_tiny_checkpoint(path: Path, size: int = 16) -> Path:
    from cgl_train.models import build_model

    torch.manual_seed(0)
    kwargs = {"num_classes": 2, "input_size": size, "width1": 4, "width2": 6}
    model = build_model("tiny_cnn", **kwargs)
    ckpt = make_checkpoint(arch="tiny_cnn", arch_kwargs=kwargs, state_dict=model.state_dict(),
                           groups={"conv2": {"groups": 2, "free": 0, "channels": 6}},
                           normalization={"mean": [0.5] * 3, "std": [0.5] * 3}, input_size=size)
    return save_checkpoint(ckpt, path)


def _worker(rank: int, world: int, port: int, argv: list[str], codes: str) -> None:
    torch.set_num_threads(1)  # a forked child must not touch the parent's OpenMP pool
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)})
    code = main(argv)
    Path(codes, f"rank{rank}").write_text(str(code))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summary(path: Path) -> dict:
    d = json.loads((path / "summary.json").read_text())
    d.pop("timings")
    return d


def test_shard_range_covers_everything_once_in_whole_batches():
    for n in (0, 1, 7, 10, 33):
        for world in (1, 2, 3):
            for bs in (1, 2, 4):
                parts = [shard_range(n, r, world, bs) for r in range(world)]
                assert parts[0][0] == 0 and parts[-1][1] == n
                assert all(parts[i][1] == parts[i + 1][0] for i in range(world - 1))
                assert all(start % bs == 0 for start, _ in parts)
                sizes = [-(-(e - s) // bs) for s, e in parts]  # batches per rank
                assert max(sizes) - min(sizes) <= 1


def test_two_processes_equal_one(tmp_path):
    root = make_concept_broden(tmp_path / "broden", n=7, size=16, seed=1)  # odd: uneven shards
    ckpt = make_tiny_checkpoint(tmp_path / "tiny.pth")
    common = ["run", str(ckpt), "--dataset", str(root), "--quiet", "--batch-size", "2", "--device", "cpu",
              "--decoded-cache", "off", "--top-k", "3", "--quantile", "0.05", "--layers", "conv1", "conv2",
              # one thread everywhere: kernels may split sums by thread count, and a forked child that starts
              # an OpenMP pool of its own after the parent used one hangs in its first parallel kernel
              "--threads", "1"]
    single = tmp_path / "single"
    assert main(common + ["--out", str(single)]) == 0
    dist_out = tmp_path / "dist"
    codes = tmp_path / "codes"
    codes.mkdir()
    # fork: the children inherit the imported modules (spawn re-imports torch: ~10 s on a busy machine)
    mp.start_processes(_worker, args=(2, _free_port(), common + ["--out", str(dist_out)], str(codes)), nprocs=2,
                       start_method="fork")
    assert [(codes / f"rank{r}").read_text() for r in range(2)] == ["0", "0"]
    for layer in ("conv1", "conv2"):
        for f in FILES:
            assert (dist_out / layer / f).read_bytes() == (single / layer / f).read_bytes(), (layer, f)
    assert summary(dist_out) == summary(single)
    groups = summary(single)["layers"][1]["groups"]
    assert [g["units"] for g in groups] == [[0, 1, 2], [3, 4, 5]]  # the checkpoint's groups


def test_one_context_class_for_training_and_dissection(monkeypatch):
    from cgl_train.distributed import DistInfo, per_rank_batch, shard_indices
    from dissect.distributed import DistContext, init_from_env

    assert DistInfo is DistContext
    monkeypatch.setenv("WORLD_SIZE", "1")
    ctx = init_from_env(torch.device("cpu"))
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.active, ctx.enabled, ctx.owns_group) == \
        (0, 1, True, False, False, False)
    third = DistContext(rank=2, world_size=3, local_rank=0)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert third.local_processes == 3 and DistContext().local_processes == 1  # thread shares (thread_plan)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # torchrun: one rank per machine
    assert third.local_processes == 1
    assert shard_indices(8, third) == [2, 5] and per_rank_batch(12, third) == 4
    assert third.enabled and not third.is_main
