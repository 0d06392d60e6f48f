"""One run at a time per output directory: an exclusive lock on `DIR/.concept-dissect.lock`.

`locked_directory(DIR, purpose)` creates DIR if needed, opens the lock file and takes
`fcntl.flock(LOCK_EX | LOCK_NB)` on it, then writes who holds it (`tool`, `purpose`, `host`,
`pid`, `started`, the shape of broden.tmpdirs' markers). The kernel drops a dead process's
flock, so a lock file left by a killed run is free and is taken over (its old content only
says whose it was). Where the filesystem has no locks, a lock file naming a live pid on
this host (or any pid on another host, which cannot be checked) still counts as held.
A second taker gets DirectoryInUse (an InputError: exit 2) naming DIR and the holder's pid.

On release the lock file is removed while still locked, and DIR too when this lock created it
and nothing was written there. A taker that locked a file some releaser unlinked meanwhile
sees that the path no longer names its file and tries again, so two runs never both hold DIR.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from broden.errors import InputError
from broden.tmpdirs import TOOL, _pid_alive, fcntl

__all__ = ["LOCK_NAME", "DirectoryInUse", "locked_directory"]

log = logging.getLogger(__name__)

LOCK_NAME = ".concept-dissect.lock"
_ATTEMPTS = 5  # retries when a releaser unlinks the file between our open and our flock


class DirectoryInUse(InputError):
    """Another live run holds the directory's lock; the message names the directory and its pid."""


def _flock(fd: int, op: int) -> None:
    fcntl.flock(fd, op)  # a module-level hook, so tests can stand in a filesystem without locks


def _holder(path: Path) -> dict[str, Any] | None:
    """The lock file's record of its holder, or None when unreadable (being written, or garbage)."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _describe(info: dict[str, Any] | None) -> str:
    if info is None:
        return "another process (its lock file is still being written)"
    since = info.get("started")
    when = (f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
            if isinstance(since, (int, float)) else "")
    return f"{info.get('purpose', 'a run')} (pid {info.get('pid')} on host {info.get('host')}{when})"


def _in_use(directory: Path, option: str, info: dict[str, Any] | None) -> DirectoryInUse:
    name = f"{option} {directory}" if option else str(directory)
    return DirectoryInUse(f"{name}: in use by {_describe(info)}; wait for it to finish, or choose another "
                          f"directory (a run that died leaves its lock free; delete {directory / LOCK_NAME} "
                          f"only if that process is gone)")


def _alive_elsewhere(info: dict[str, Any] | None) -> bool:
    """Without flock: whether the recorded holder may still run (unknown hosts count as alive)."""
    if info is None or not isinstance(info.get("pid"), int):
        return False
    if info.get("host") != socket.gethostname():
        return True
    return info["pid"] != os.getpid() and _pid_alive(info["pid"])


def _try_lock(path: Path, directory: Path, option: str) -> int | None:
    """Open and lock `path`; the fd, or None when the file was unlinked meanwhile (retry)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = False
        if fcntl is not None:
            try:
                _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                raise _in_use(directory, option, _holder(path)) from None
            except OSError:  # no locks on this filesystem: fall back to the recorded pid
                pass
        if not locked and _alive_elsewhere(_holder(path)):
            raise _in_use(directory, option, _holder(path))
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
    except BaseException:
        os.close(fd)
        raise
    if not same:
        os.close(fd)
        return None
    return fd


def _write_record(fd: int, path: Path, purpose: str) -> None:
    old = _holder(path)
    if old is not None and old.get("pid") not in (None, os.getpid()):
        log.info("%s: taking over the lock of %s, which no longer holds it", path.parent, _describe(old))
    record = {"tool": TOOL, "purpose": purpose, "host": socket.gethostname(), "pid": os.getpid(),
              "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)


@contextmanager
def locked_directory(directory: str | Path, purpose: str, option: str = "") -> Iterator[Path]:
    """Hold the exclusive lock of `directory` (created if needed) for the block; yields the lock file.

    `purpose` ("dissect run", "cgl-train") is recorded for whoever finds it held; `option` (e.g.
    "--out") names the directory in errors. Raises DirectoryInUse when a live run holds it.
    """
    directory = Path(directory)
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{option + ' ' if option else ''}{directory}: cannot create the directory "
                         f"({e.strerror or e})") from None
    if not directory.is_dir():
        raise InputError(f"{option + ' ' if option else ''}{directory}: exists and is not a directory")
    path = directory / LOCK_NAME
    fd = None
    try:
        for _ in range(_ATTEMPTS):
            fd = _try_lock(path, directory, option)
            if fd is not None:
                break
        if fd is None:
            raise _in_use(directory, option, _holder(path))
        _write_record(fd, path, purpose)
        yield path
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)  # while still locked: nobody else holds this file
            os.close(fd)
        if created:
            try:
                directory.rmdir()  # only when nothing was written there
            except OSError:
                pass
