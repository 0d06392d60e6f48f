"""DDP (torchrun, gloo, 2 CPU processes) gives the weights of one process on the same global batch.

Exactness needs care: L_task is a mean over the batch, so the mean of the two
ranks' gradients (what DDP all-reduces) equals the single-process gradient of
the global batch; R_bn depends on the weights only. L_g and L_s do not split
that way: psi divides by S, the per-channel std over the *local* minibatch, and
the paper-form L_g is a ratio of sums over the minibatch. So this test uses
lambda_g = lambda_s = 0 (and no monitoring) and lambda_bn > 0, and compares
with a float tolerance (the all-reduce sums in a different order).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from broden.synthetic import generate_shapes_dataset
from dissect.checkpoint import load_checkpoint
from cgl_train.config import TrainConfig
from cgl_train.engine import read_log, train

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes_equal_one_process_on_the_same_global_batch(tmp_path):
    shapes = generate_shapes_dataset(tmp_path / "shapes", per_class=1, size=32, seed=0, progress=False)
    # 36 train images, global batch 12 (6 per rank): three steps, every batch split evenly
    opts = dict(data="synthetic", synthetic_dir=str(shapes), synthetic_per_class=1, synthetic_size=32,
                arch_kwargs={"width1": 8, "width2": 16}, groups=4, epochs=2, batch_size=12, workers=0,
                lambda_bn=1e-2, lambda_g=0.0, lambda_s=0.0, monitor=False, lr=0.05, seed=3, quiet=True)
    single = train(TrainConfig(out=str(tmp_path / "single"), **opts))

    config = tmp_path / "ddp.json"
    config.write_text(json.dumps({**opts, "out": str(tmp_path / "ddp")}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "cgl_train", "--config", str(config), "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 processes" in proc.stdout and proc.stdout.count("trained ") == 1  # only rank 0 prints

    ddp_dir = tmp_path / "ddp"
    assert sorted(p.name for p in ddp_dir.iterdir()) == ["best.pth", "config.json", "latest.pth", "log.jsonl"]
    a, b = load_checkpoint(single.latest), load_checkpoint(ddp_dir / "latest.pth")
    assert b["world_size"] == 2 and a["world_size"] == 1
    for k, wa in a["state_dict"].items():
        assert torch.allclose(wa, b["state_dict"][k], rtol=1e-4, atol=1e-6), k
    # the weights moved: equality is not the trivial "nothing was trained"
    assert not torch.allclose(a["state_dict"]["conv1.weight"], b["state_dict"]["conv1.weight"] * 0.9)
    log_a = single.history
    header, log_b = read_log(ddp_dir / "log.jsonl")
    assert header["world_size"] == 2 and header["seed"] == 3
    for ea, eb in zip(log_a, log_b, strict=True):
        assert eb["val_images"] == ea["val_images"] == 9  # every val image counted once over the ranks
        assert eb["task"] == pytest.approx(ea["task"], rel=1e-4)
        assert eb["r_bn"] == pytest.approx(ea["r_bn"], rel=1e-5)
        assert eb["train_top1"] == ea["train_top1"]
        assert eb["val_loss"] == pytest.approx(ea["val_loss"], rel=1e-4)
