"""Issue 13, a fault campaign on `cgl-train`: a kill between the two checkpoint saves, non-finite
training, and DataLoader workers outliving a killed run."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cgl_train.engine as engine
from cgl_train.cli import main
from cgl_train.engine import build_loaders, build_trainer, train, train_one_epoch
from cgl_train.data import build_datasets
from dissect.checkpoint import load_checkpoint
from test_train import config, image_folder, shapes  # noqa: F401  (shapes: a module fixture)

REPO = Path(__file__).resolve().parent.parent


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not an Exception, so no handler catches it)."""


def scripted_val_top1(monkeypatch, values: list[float]) -> None:
    """Make validation return `values` in order, one per validated epoch (the rest of evaluate unchanged)."""
    real = engine.evaluate
    queue = list(values)

    def evaluate(*args, **kwargs):
        return {**real(*args, **kwargs), "val_top1": queue.pop(0)}

    monkeypatch.setattr(engine, "evaluate", evaluate)


def kill_at_save(monkeypatch, call: int) -> None:
    """Kill the run at the `call`-th save_checkpoint (1-based), before it writes anything."""
    real = engine.save_checkpoint
    count = [0]

    def save(ckpt, path):
        count[0] += 1
        if count[0] == call:
            raise Killed(path)
        return real(ckpt, path)

    monkeypatch.setattr(engine, "save_checkpoint", save)


def best_record(out: Path) -> tuple[int, float]:
    best = load_checkpoint(out / "best.pth")
    return best["epoch"], best["metrics"]["val_top1"]


# ---------------------------------------------------------------- 1. best.pth survives a kill between saves

def test_a_kill_between_the_two_saves_of_an_improving_epoch_loses_no_best(shapes, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = config(shapes, out, epochs=3, lr_schedule="constant")
    # epoch 2 is the best; the kill comes at the second save of epoch 2 (saves: 1 = epoch 1's
    # latest or best, 2 = its other one, 3 and 4 = epoch 2's)
    scripted_val_top1(monkeypatch, [0.5, 0.7])
    kill_at_save(monkeypatch, 4)
    with pytest.raises(Killed):
        train(cfg)
    monkeypatch.undo()
    scripted_val_top1(monkeypatch, [0.7, 0.6] if load_checkpoint(out / "latest.pth")["epoch"] == 1 else [0.6])
    result = train(cfg.replace(resume=True))
    latest = load_checkpoint(result.latest)
    assert latest["epoch"] == 3 and latest["best_top1"] == 0.7
    assert result.best == out / "best.pth"
    assert best_record(out) == (2, 0.7)  # best.pth holds the best epoch latest.pth records


def test_latest_never_records_a_best_that_is_not_on_disk(shapes, tmp_path, monkeypatch):
    out = tmp_path / "run"
    scripted_val_top1(monkeypatch, [0.5, 0.7])
    kill_at_save(monkeypatch, 4)  # epoch 2 improves; killed between its two saves
    with pytest.raises(Killed):
        train(config(shapes, out, epochs=3, lr_schedule="constant"))
    latest = load_checkpoint(out / "latest.pth")
    best_epoch, best_top1 = best_record(out)
    # whichever save the kill interrupted, latest.pth's record of the best is no newer than best.pth
    assert latest["epoch"] == 1 and latest["best_top1"] == 0.5 and best_epoch >= 1


def test_resume_restores_best_from_latest_when_latest_is_the_best_epoch(shapes, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    cfg = config(shapes, out, epochs=3, lr_schedule="constant")
    scripted_val_top1(monkeypatch, [0.5, 0.7, 0.6])
    train(cfg.replace(epochs=2))
    (out / "best.pth").unlink()  # lost: latest.pth (epoch 2) records it as the best
    with caplog.at_level(logging.WARNING, logger="cgl_train"):
        result = train(cfg.replace(resume=True))
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(str(out / "best.pth") in m and "missing" in m and "latest.pth" in m for m in messages), messages
    assert result.best == out / "best.pth"
    assert best_record(out) == (2, 0.7)
    assert load_checkpoint(result.latest)["best_top1"] == 0.7


def test_resume_says_when_best_is_lost_and_writes_it_at_the_next_improvement(shapes, tmp_path, monkeypatch,
                                                                             caplog):
    out = tmp_path / "run"
    cfg = config(shapes, out, epochs=4, lr_schedule="constant")
    scripted_val_top1(monkeypatch, [0.7, 0.5, 0.6, 0.8])
    train(cfg.replace(epochs=2))
    (out / "best.pth").unlink()  # epoch 1's: no copy of it is left anywhere
    with caplog.at_level(logging.WARNING, logger="cgl_train"):
        train(cfg.replace(epochs=3, resume=True))
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(str(out / "best.pth") in m and "epoch 1" in m for m in messages), messages
    assert not (out / "best.pth").exists()
    latest = load_checkpoint(out / "latest.pth")
    assert latest["best_top1"] == 0.7 and latest["best_epoch"] == 1 and latest["best_missing"] is True
    result = train(cfg.replace(resume=True))  # epoch 4 improves on 0.7: best.pth again
    assert best_record(out) == (4, 0.8)
    latest = load_checkpoint(result.latest)
    assert latest["best_missing"] is False and latest["best_epoch"] == 4


def test_resume_sets_aside_a_best_checkpoint_that_latest_does_not_record(shapes, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    cfg = config(shapes, out, epochs=3, lr_schedule="constant")
    scripted_val_top1(monkeypatch, [0.7, 0.5, 0.6])
    train(cfg.replace(epochs=2))
    epoch1 = (out / "best.pth").read_bytes()
    ckpt = load_checkpoint(out / "latest.pth")
    ckpt["metrics"]["val_top1"] = 0.9  # someone else's best.pth: not the one latest.pth records
    engine.save_checkpoint(ckpt, out / "best.pth")
    with caplog.at_level(logging.WARNING, logger="cgl_train"):
        train(cfg.replace(resume=True))
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(str(out / "best.pth") in m and "best.stale.pth" in m for m in messages), messages
    assert load_checkpoint(out / "best.stale.pth")["metrics"]["val_top1"] == 0.9  # kept, not deleted
    assert not (out / "best.pth").exists() and epoch1 != (out / "best.stale.pth").read_bytes()


def test_a_new_run_sets_aside_a_best_left_by_a_run_killed_before_its_first_latest(shapes, tmp_path, monkeypatch,
                                                                                 caplog):
    out = tmp_path / "run"
    cfg = config(shapes, out)
    kill_at_save(monkeypatch, 2)  # epoch 1: best.pth saved, then killed
    with pytest.raises(Killed):
        train(cfg)
    monkeypatch.undo()
    assert (out / "best.pth").exists() and not (out / "latest.pth").exists()
    with caplog.at_level(logging.WARNING, logger="cgl_train"):
        result = train(cfg)
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(str(out / "best.pth") in m and "best.stale.pth" in m and "no latest.pth" in m
               for m in messages), messages
    assert result.best == out / "best.pth" and load_checkpoint(out / "best.pth")["epoch"] == 1
    assert (out / "best.stale.pth").exists()


# ---------------------------------------------------------------- 2. non-finite training stops the run

def cli_args(shapes: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", "synthetic", "--synthetic-dir", str(shapes), "--synthetic-per-class", "1",
            "--synthetic-size", "32", "--arch-kwargs", '{"width1": 8, "width2": 16}', "--out", str(out),
            "--batch-size", "12", "--workers", "0", "--groups", "4", "--lr-schedule", "constant", "--quiet", *extra]


def poison_objective_at(monkeypatch, term: str, step: int) -> None:
    """Make the objective's `term` infinite at the `step`-th training step (1-based, over the run)."""
    real = engine.build_trainer
    count = [0]

    def build(*args, **kwargs):
        trainer = real(*args, **kwargs)

        def hook(module, inputs, out):
            if module.training:
                count[0] += 1
                if count[0] == step:
                    return {**out, term: out[term] * float("inf")}
            return out

        trainer.objective.register_forward_hook(hook)
        return trainer

    monkeypatch.setattr(engine, "build_trainer", build)


def test_a_non_finite_cgl_term_stops_the_run_leaving_the_last_good_checkpoint(shapes, tmp_path, monkeypatch,
                                                                               capsys):
    out = tmp_path / "run"
    args = cli_args(shapes, out, "--lambda-s", "1e-2", "--epochs", "3")
    # 36 images in batches of 12: steps 1-3 are epoch 1, step 5 is epoch 2's second batch
    poison_objective_at(monkeypatch, "l_s", 5)
    saved = {}
    real_train_one_epoch = engine.train_one_epoch

    def after_epoch_1(trainer, loader, epoch):
        if epoch == 1:  # what epoch 1 left on disk
            saved.update({name: (out / name).read_bytes() for name in ("latest.pth", "best.pth", "log.jsonl")})
        return real_train_one_epoch(trainer, loader, epoch)

    monkeypatch.setattr(engine, "train_one_epoch", after_epoch_1)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "epoch 2" in err and "step 2 of 3" in err and "l_s" in err and "task" not in err
    assert "Traceback" not in err and str(out / "latest.pth") in err
    assert set(saved) == {"latest.pth", "best.pth", "log.jsonl"}
    for name, data in saved.items():
        assert (out / name).read_bytes() == data, name  # nothing written for the bad epoch
    assert load_checkpoint(out / "latest.pth")["epoch"] == 1


def test_a_huge_learning_rate_stops_in_the_first_epoch_writing_no_checkpoint(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli_args(shapes, out, "--lr", "1e30", "--epochs", "2", "--momentum", "0")) == 1
    err = capsys.readouterr().err
    assert "epoch 1" in err and "task" in err and "not finite" in err and "Traceback" not in err
    assert not (out / "latest.pth").exists() and not (out / "best.pth").exists()


def test_non_finite_gradients_stop_the_epoch_naming_the_step(shapes, tmp_path):
    cfg = config(shapes, tmp_path, lambda_bn=1e-3, lr_schedule="constant")
    data = build_datasets(cfg, progress=False)
    trainer = build_trainer(cfg, data.num_classes, data.input_size, torch.device("cpu"))
    loaders = build_loaders(cfg, data)
    loaders.set_epoch(0)
    calls = [0]

    def poison(grad):
        calls[0] += 1
        return grad * float("inf") if calls[0] == 2 else grad

    trainer.net.conv1.weight.register_hook(poison)  # the loss stays finite at step 2, its gradient does not
    with pytest.raises(engine.NonFiniteTraining) as e:
        train_one_epoch(trainer, loaders.train, 0)
    msg = str(e.value)
    assert "epoch 1" in msg and "step 2 of 3" in msg and "gradients" in msg
    assert "task" not in msg and "r_bn" not in msg


def test_steps_the_grad_scaler_skips_are_not_errors_but_a_non_finite_loss_is(shapes, tmp_path, monkeypatch):
    cfg = config(shapes, tmp_path, lr_schedule="constant")
    data = build_datasets(cfg, progress=False)
    loaders = build_loaders(cfg, data)
    loaders.set_epoch(0)

    def amp_like_trainer():
        trainer = build_trainer(cfg, data.num_classes, data.input_size, torch.device("cpu"))
        trainer.scaler = torch.amp.GradScaler("cpu", enabled=True)  # skips inf/NaN steps, as under AMP
        return trainer

    trainer = amp_like_trainer()
    trainer.net.conv1.weight.register_hook(lambda g: g * float("inf"))
    entry = train_one_epoch(trainer, loaders.train, 0)  # every step skipped by the scaler: no error
    assert entry["task"] is not None and trainer.scaler.get_scale() < 65536.0
    trainer = amp_like_trainer()
    trainer.net.fc.register_forward_hook(lambda m, i, out: out * float("nan"))
    with pytest.raises(engine.NonFiniteTraining, match=r"epoch 1.*step 1 .*task"):
        train_one_epoch(trainer, loaders.train, 0)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_non_finite_lr_is_bad_input(tmp_path, capsys, value):
    assert main(["--lr", value, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "lr" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- 3. workers die with a killed run

def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a live process, from /proc/PID/stat; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
    return fields[0], int(fields[1]), int(fields[19])


def _children(pid: int) -> dict[int, int]:
    """Child pid -> start time, by scanning /proc (no psutil)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[1] == pid and stat[0] != "Z":
                found[int(entry.name)] = stat[2]
    return found


def _alive(pid: int, start: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[2] == start and stat[0] != "Z"  # a zombie has exited


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_dataloader_workers_exit_with_a_killed_run(tmp_path):
    root = image_folder(tmp_path / "imgs", classes=2, per_class=40, size=(40, 48))
    cmd = [sys.executable, "-m", "cgl_train", "--data", str(root), "--input-size", "16", "--workers", "2",
           "--batch-size", "2", "--epochs", "100", "--device", "cpu", "--out", str(tmp_path / "run"),
           "--arch-kwargs", '{"width1": 8, "width2": 16}', "--groups", "4", "--quiet"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        workers: dict[int, int] = {}
        while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            workers = _children(proc.pid)
        assert len(workers) >= 2, f"no workers seen (exit code {proc.poll()})"
        time.sleep(0.3)  # the workers are past their start-up, loading batches
        workers = {pid: start for pid, start in workers.items() if _alive(pid, start)} or workers
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 2.0
        while any(_alive(p, s) for p, s in workers.items()) and time.monotonic() < deadline:
            time.sleep(0.02)
        survivors = [p for p, s in workers.items() if _alive(p, s)]
        assert not survivors, f"workers {survivors} outlived the killed run by 2 s"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
