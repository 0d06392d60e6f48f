"""Leftover temporary directories of killed extractions and cache builds: the next run removes the stale
ones this tool made (name pattern AND marker), and never a live one or a look-alike without a marker."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from broden.cache import build_cache, source_fingerprint
from broden.download import download_dataset
from broden_fixtures import make_tiny_broden
from test_download import NAME, _assert_extracted, _broden_zip

HOST = socket.gethostname()
REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)


def _leftover(parent: Path, name: str, marker: dict | None, age_s: float = 0.0) -> Path:
    """A temporary directory as a killed run leaves it: some content, maybe a marker, maybe old."""
    d = parent / name
    (d / "content" / NAME).mkdir(parents=True)
    (d / "content" / NAME / "index.csv").write_text("half\n")
    if marker is not None:
        (d / "owner.json").write_text(json.dumps(marker))
    if age_s:
        t = time.time() - age_s
        for p in [*d.rglob("*"), d]:
            os.utime(p, (t, t))
    return d


@pytest.fixture
def to(tmp_path) -> Path:
    """A download directory with the zip in place, so download_dataset runs offline."""
    d = tmp_path / "dl"
    d.mkdir()
    (d / f"{NAME}.zip").write_bytes(_broden_zip(tmp_path))
    return d


def test_stale_extraction_dirs_are_removed_live_and_lookalikes_kept(to):
    dead = _leftover(to, f".{NAME}.extract-dead0001", {"host": HOST, "pid": _dead_pid(), "started": 0})
    live = _leftover(to, f".{NAME}.extract-live0001", {"host": HOST, "pid": os.getpid(), "started": 0},
                     age_s=3 * 86400)  # alive on this host: kept however old
    far_old = _leftover(to, f".{NAME}.extract-far00001", {"host": "elsewhere", "pid": 1}, age_s=3 * 86400)
    far_new = _leftover(to, f".{NAME}.extract-far00002", {"host": "elsewhere", "pid": 1}, age_s=600)
    lookalike = _leftover(to, f".{NAME}.extract-user0001", None, age_s=3 * 86400)  # no marker: not ours
    garbled = _leftover(to, f".{NAME}.extract-junk0001", None, age_s=3 * 86400)
    (garbled / "owner.json").write_text("{not json")
    unrelated = _leftover(to, ".something.extract-dead0002", {"host": HOST, "pid": _dead_pid()})
    out = download_dataset(NAME, to, include_reference=False, progress=False)
    assert not dead.exists() and not far_old.exists()
    for kept in (live, far_new, lookalike, garbled, unrelated):
        assert kept.is_dir() and (kept / "content" / NAME / "index.csv").read_text() == "half\n", kept
    assert (out / "index.csv").is_file()


def test_a_killed_extraction_is_cleaned_up_by_the_next_run(to):
    script = textwrap.dedent(f"""
        import time, zipfile
        from pathlib import Path
        from broden.download import extract_archive
        real = zipfile.ZipFile.extract
        def slow(self, member, path=None, pwd=None):
            time.sleep(30)
            return real(self, member, path, pwd)
        zipfile.ZipFile.extract = slow
        extract_archive(Path({str(to / f"{NAME}.zip")!r}), Path({str(to)!r}), {NAME!r}, show_progress=False)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.time() + 20
        tmps: list[Path] = []
        while time.time() < deadline and not (tmps and (tmps[0] / "owner.json").is_file()):
            tmps = list(to.glob(f".{NAME}.extract-*"))
            time.sleep(0.05)
        assert len(tmps) == 1
        time.sleep(0.2)  # the marker is written whole before the first member is extracted
        marker = json.loads((tmps[0] / "owner.json").read_text())
        assert marker["pid"] == proc.pid and marker["host"] == HOST and marker["purpose"] == "extraction"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert tmps[0].is_dir()  # SIGKILL leaves it behind ...
        out = download_dataset(NAME, to, include_reference=False, progress=False)
        assert not tmps[0].exists()  # ... and the next run removes it
        _assert_extracted(out, to, (to / f"{NAME}.zip").read_bytes())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stale_cache_builds_of_other_sources_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("DISSECT_CACHE_DIR", str(tmp_path / "cache"))
    root = make_tiny_broden(tmp_path / "broden")
    base = tmp_path / "cache" / "decoded"
    base.mkdir(parents=True)
    other = "0123456789abcdef"  # the fingerprint prefix of a source that changed since
    assert not source_fingerprint(root).startswith(other)
    dead = _leftover(base, f".tmp-{other}-4242-abcd1234", {"host": HOST, "pid": _dead_pid()})
    live = _leftover(base, f".tmp-{other}-{os.getpid()}-abcd1235", {"host": HOST, "pid": os.getpid()},
                     age_s=3 * 86400)
    lookalike = _leftover(base, f".tmp-{other}-4243-abcd1236", None, age_s=3 * 86400)
    build_cache(root, progress=False)
    assert not dead.exists()
    assert live.is_dir() and lookalike.is_dir()


def test_cache_build_dirs_carry_the_marker(tmp_path, monkeypatch):
    import broden.cache as cache_mod

    monkeypatch.setenv("DISSECT_CACHE_DIR", str(tmp_path / "cache"))
    root = make_tiny_broden(tmp_path / "broden")
    seen: list[dict] = []
    real = cache_mod.decode_label_png

    def peek(path):
        if not seen:
            (tmp,) = (tmp_path / "cache" / "decoded").glob(".tmp-*")
            seen.append(json.loads((tmp / "owner.json").read_text()))
        return real(path)

    monkeypatch.setattr(cache_mod, "decode_label_png", peek)
    build_cache(root, progress=False, workers=1)
    assert seen[0]["pid"] == os.getpid() and seen[0]["host"] == HOST and seen[0]["purpose"] == "cache-build"
