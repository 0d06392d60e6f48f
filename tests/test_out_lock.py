"""An output directory is used by one run at a time: `dissect run --out` and `cgl-train --out` take an
exclusive lock on it (broden._locks); a second run fails with exit 2 naming the directory and the pid."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from broden._locks import LOCK_NAME, DirectoryInUse, locked_directory
from broden.errors import InputError
from dissect.cli import main
from test_run_cli import red_detector_checkpoint, run_args

REPO = Path(__file__).resolve().parent.parent

HOLDER = """
import sys, time
from broden._locks import locked_directory
with locked_directory(sys.argv[1], "test holder"):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder():
    """Start a process that holds the lock on a directory; yields start(dir) -> Popen; kills it at the end."""
    procs: list[subprocess.Popen] = []

    def start(directory: Path) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE,
                                text=True, env=env, cwd=REPO)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_the_lock_file_names_the_holder_and_goes_with_it(tmp_path):
    d = tmp_path / "out"
    with locked_directory(d, "dissect run") as lock:
        assert lock == d / LOCK_NAME
        info = json.loads(lock.read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert info["purpose"] == "dissect run" and info["tool"] == "concept-dissect"
        # a second lock, even from this process, is refused naming the directory and the pid
        with pytest.raises(DirectoryInUse) as e:
            with locked_directory(d, "another run"):
                pass
        assert str(d) in str(e.value) and f"pid {os.getpid()}" in str(e.value)
        assert isinstance(e.value, InputError)
        (d / "result.txt").write_text("x")
    assert not lock.exists() and (d / "result.txt").is_file()


def test_a_directory_the_lock_created_goes_when_the_run_leaves_it_empty(tmp_path):
    d = tmp_path / "new" / "out"
    with pytest.raises(InputError):
        with locked_directory(d, "dissect run"):
            raise InputError("bad input found after the lock was taken")
    assert not d.exists() and (tmp_path / "new").is_dir()
    existing = tmp_path / "existing"
    existing.mkdir()
    with locked_directory(existing, "dissect run"):
        pass
    assert existing.is_dir()  # not ours to remove


def test_another_process_holding_the_lock_is_named(tmp_path, holder):
    d = tmp_path / "out"
    proc = holder(d)
    with pytest.raises(DirectoryInUse) as e:
        with locked_directory(d, "dissect run"):
            pass
    msg = str(e.value)
    assert str(d) in msg and f"pid {proc.pid}" in msg and "test holder" in msg


def test_a_dead_holders_lock_file_is_taken_over(tmp_path, holder, caplog):
    d = tmp_path / "out"
    proc = holder(d)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((d / LOCK_NAME).read_text())["pid"] == proc.pid  # left behind by the killed process
    with caplog.at_level("INFO", logger="broden"):
        with locked_directory(d, "dissect run") as lock:
            assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert any(f"pid {proc.pid}" in r.getMessage() for r in caplog.records)


def test_garbage_in_a_free_lock_file_is_taken_over(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    (d / LOCK_NAME).write_text("{not json")
    with locked_directory(d, "dissect run") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_without_flock_a_live_pid_on_this_host_still_holds_it(tmp_path, holder, monkeypatch):
    import broden._locks as locks

    d = tmp_path / "out"
    proc = holder(d)

    def no_locks(fd, op):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(locks, "_flock", no_locks)
    with pytest.raises(DirectoryInUse, match=f"pid {proc.pid}"):
        with locked_directory(d, "dissect run"):
            pass
    proc.kill()
    proc.wait()
    with locked_directory(d, "dissect run"):  # its pid is gone: taken over
        pass


# ---------------------------------------------------------------- the commands

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return red_detector_checkpoint(tmp_path_factory.mktemp("lock") / "red.pth")


def test_dissect_run_on_a_directory_in_use_exits_2(tmp_path, ckpt, holder, capsys):
    out = tmp_path / "out"
    proc = holder(out)
    rc = main(run_args(tmp_path, ckpt, out, "--no-report"))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert str(out) in err and f"pid {proc.pid}" in err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written
    proc.kill()
    proc.wait()
    assert main(run_args(tmp_path, ckpt, out, "--no-report")) == 0
    assert (out / "summary.json").is_file() and not (out / LOCK_NAME).exists()


def test_run_holds_the_lock_while_it_works(tmp_path, ckpt, monkeypatch):
    import dissect.pipeline as pipeline

    out = tmp_path / "out"
    seen = {}
    real = pipeline.run_dissection

    def spy(loaded, ds, config, out_path, ctx):
        try:
            with locked_directory(out_path, "intruder"):
                seen["locked"] = False
        except DirectoryInUse as e:
            seen["locked"] = str(e)
        return real(loaded, ds, config, out_path, ctx)

    monkeypatch.setattr(pipeline, "run_dissection", spy)
    assert main(run_args(tmp_path, ckpt, out, "--no-report")) == 0
    assert f"pid {os.getpid()}" in seen["locked"] and "dissect run" in seen["locked"]


def test_cgl_train_on_a_directory_in_use_exits_2(tmp_path, holder, capsys):
    from cgl_train.cli import main as train_main

    out = tmp_path / "run"
    proc = holder(out)
    rc = train_main(["--data", "synthetic", "--synthetic-per-class", "1", "--synthetic-size", "32",
                     "--synthetic-dir", str(tmp_path / "shapes"), "--out", str(out), "--quiet", "--epochs", "1"])
    assert not (tmp_path / "shapes").exists()  # refused before any work
    err = capsys.readouterr().err
    assert rc == 2, err
    assert str(out) in err and f"pid {proc.pid}" in err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
