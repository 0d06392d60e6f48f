"""Issue 13, a fault campaign on `cgl-train`: a kill between the two checkpoint saves."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

import cgl_train.engine as engine
from cgl_train.engine import train
from dissect.checkpoint import load_checkpoint
from test_train import config, shapes  # noqa: F401  (shapes: a module fixture)


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
