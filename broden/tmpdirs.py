"""Marked temporary directories: what a killed extraction or cache build leaves behind can be cleaned up.

The creating process takes an exclusive flock on `<tmp>/.lock`, then writes the
marker `<tmp>/owner.json` (`tool`, `purpose`, `host`, `pid`, `started`) and
holds the lock until it is done with the directory. A later run removes such a
directory, found by its name pattern, only when it is stale:

- its marker exists and its lock is free (the kernel drops a dead process's
  locks, and the owner locked before writing the marker), or
- its marker names this host and a pid that no longer runs, or
- its marker names another host (or locks are unavailable) and nothing in it
  changed for `max_age` seconds.

A live directory (lock held, or owner alive on this host) is never touched, and
nor is one without a readable marker, unless the caller asks for the cache's
older age-only rule (`require_marker=False`).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterable

__all__ = ["MARKER", "LOCK", "TOOL", "make_marked_tempdir", "claim", "release", "read_marker",
           "is_stale", "remove_stale"]

log = logging.getLogger(__name__)

MARKER = "owner.json"
LOCK = ".lock"
TOOL = "concept-dissect"

try:
    import fcntl
except ImportError:  # not on Windows: liveness then rests on the owner's pid and the age
    fcntl = None  # type: ignore[assignment]


def claim(tmp: Path, purpose: str) -> int:
    """Lock `tmp/.lock` for this process, then write the marker; returns the lock's fd (keep it open)."""
    fd = os.open(tmp / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is not None:
        try:
            # blocking: a cleaner probing this lock holds it for an instant only
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no locks on this filesystem: the marker's pid and the age still protect it
            pass
    marker = {"tool": TOOL, "purpose": purpose, "host": socket.gethostname(), "pid": os.getpid(),
              "started": time.time()}
    # written under a temporary name and renamed: a reader never sees half a marker
    part = tmp / f".{MARKER}.part"
    part.write_text(json.dumps(marker) + "\n")
    os.replace(part, tmp / MARKER)
    return fd


def release(fd: int | None) -> None:
    """Close the lock fd returned by claim (the lock goes with it)."""
    if fd is not None:
        os.close(fd)


def make_marked_tempdir(parent: Path, prefix: str, purpose: str) -> tuple[Path, int]:
    """mkdtemp(prefix, dir=parent), claimed at once; returns (path, lock fd)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        return tmp, claim(tmp, purpose)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_marker(tmp: Path) -> dict | None:
    """The marker of `tmp` when it is a readable one (host and a positive pid); else None."""
    try:
        marker = json.loads((tmp / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("host"), str):
        return None
    pid = marker.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    return marker


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else; or cannot tell
        return True  # treat as alive: never remove a directory that may be in use
    return True


def _lock_state(tmp: Path) -> bool | None:
    """True when a live process holds `tmp/.lock`, False when it is free, None when unknown."""
    if fcntl is None:
        return None
    try:
        fd = os.open(tmp / LOCK, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # e.g. a filesystem without locks
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _last_change(tmp: Path) -> float:
    """Newest mtime of the directory and its entries (a running build keeps writing into it)."""
    newest = tmp.stat().st_mtime
    for entry in os.scandir(tmp):
        try:
            newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
        except OSError:
            pass
    return newest


def is_stale(tmp: Path, max_age: float, now: float, require_marker: bool = True) -> bool:
    """Whether `tmp` is a leftover nobody uses (rules in the module docstring)."""
    # the marker before the lock: a marker seen now was written while its owner already held the lock
    marker = read_marker(tmp)
    if marker is None:
        if require_marker:
            return False
        return _lock_state(tmp) is not True and now - _last_change(tmp) > max_age
    held = _lock_state(tmp)
    if held:
        return False
    if held is False:
        return True
    if marker["host"] == socket.gethostname():
        return not _pid_alive(marker["pid"])
    return now - _last_change(tmp) > max_age


def remove_stale(candidates: Iterable[Path], max_age: float, require_marker: bool = True,
                 what: str = "temporary directory") -> list[Path]:
    """Remove the stale directories among `candidates` (already matched by name); return them."""
    removed = []
    now = time.time()
    for tmp in sorted(candidates):
        try:
            if tmp.is_symlink() or not tmp.is_dir() or not is_stale(tmp, max_age, now, require_marker):
                continue
        except OSError:  # vanished meanwhile (its owner finished, or another cleaner got it)
            continue
        log.info("removing stale %s %s", what, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed
