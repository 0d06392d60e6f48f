"""broden.cache: the decoded arrays, cache hit equals decoding, staleness, interrupted builds."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import broden.cache as cache_mod
from broden.cache import build_cache, default_cache_dir, open_cache, source_fingerprint
from broden.dataset import BrodenDataset, collate
from broden.errors import InputError
from broden.writer import BrodenWriter
from broden_fixtures import make_tiny_broden, tiny_broden_spec


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("DISSECT_CACHE_DIR", str(d))
    return d


@pytest.fixture
def tiny(tmp_path) -> Path:
    return make_tiny_broden(tmp_path / "broden")


def _items_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert a["index"] == b["index"]
    for k in ("image", "labels", "image_labels"):
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DISSECT_CACHE_DIR", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("DISSECT_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "concept-dissect"


def test_arrays_follow_the_contract(tiny, cache_dir):
    path = build_cache(tiny, progress=False)
    assert path == cache_dir / "decoded" / source_fingerprint(tiny)
    info = json.loads((path / "meta.json").read_text())
    assert info["fingerprint"] == path.name and info["num_images"] == 7
    spec = tiny_broden_spec()
    planes_per_row = [sum(len(v) for v in r["layers"].values()) for r in spec]  # 5, 2, 3, 1, 2, 2, 5
    ids_per_row = [sum(len(v) for v in r["image_labels"].values()) for r in spec]
    arrays = {p.stem: np.load(p) for p in path.glob("*.npy")}
    assert arrays["images"].shape == (7, 3, 8, 8) and arrays["images"].dtype == np.uint8
    assert arrays["planes"].shape == (sum(planes_per_row), 4, 4) and arrays["planes"].dtype == np.int16
    assert arrays["plane_offsets"].dtype == np.int64
    assert arrays["plane_offsets"].tolist() == np.concatenate([[0], np.cumsum(planes_per_row)]).tolist()
    assert arrays["plane_category"].dtype == np.int16
    # row 0: color, object, part, part, material
    assert arrays["plane_category"][:5].tolist() == [0, 1, 2, 2, 3]
    assert arrays["image_labels"].dtype == np.int32
    assert arrays["image_labels"][:3].tolist() == [400, 314, 194]
    assert arrays["image_label_offsets"].tolist() == np.concatenate([[0], np.cumsum(ids_per_row)]).tolist()
    assert arrays["image_label_category"].dtype == np.int16
    assert arrays["image_label_category"][:3].tolist() == [4, 5, 5]
    np.testing.assert_array_equal(arrays["images"][0], spec[0]["image"].transpose(2, 0, 1))
    np.testing.assert_array_equal(arrays["planes"][2], spec[0]["layers"]["part"][0])


@pytest.mark.parametrize("categories", [None, ["part", "scene"], ["texture"]])
def test_cache_equals_decoding(tiny, cache_dir, categories):
    off = BrodenDataset(tiny, categories=categories, cache="off")
    assert BrodenDataset(tiny, categories=categories).cache is None  # nothing built yet
    build_cache(tiny, progress=False)
    cached = BrodenDataset(tiny, categories=categories)
    assert cached.cache is not None
    for i in range(len(off)):
        _items_equal(cached[i], off[i])
    for order in ([5, 0, 6, 3], range(1, 5), [2]):  # scattered rows, a consecutive run (sliced), one row
        batch, want = cached.get_batch(order), collate([off[i] for i in order])
        for k in want:
            assert batch[k].dtype == want[k].dtype and torch.equal(batch[k], want[k]), k


def test_cache_with_split_and_explicit_paths(tiny, tmp_path, cache_dir):
    path = build_cache(tiny, cache_dir=tmp_path / "elsewhere", progress=False)
    assert not cache_dir.exists()
    off = BrodenDataset(tiny, split="val", cache="off")
    for cache in (tmp_path / "elsewhere", path):  # a cache dir, or the decoded dir itself
        ds = BrodenDataset(tiny, split="val", cache=cache)
        assert ds.cache is not None and ds.cache.path == path
        for i in range(len(off)):
            _items_equal(ds[i], off[i])
        b, w = ds.get_batch([2, 1]), collate([off[2], off[1]])
        assert all(torch.equal(b[k], w[k]) for k in w)
    # pickling (DataLoader workers) drops the maps and reopens them
    clone = pickle.loads(pickle.dumps(ds))
    _items_equal(clone[0], off[0])


def test_rebuilt_when_source_changes(tiny, cache_dir):
    first = build_cache(tiny, progress=False)
    assert build_cache(tiny, progress=False) == first  # up to date: reused
    new = np.full((4, 4), 5, dtype=np.int32)
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0] = new
    png = tiny / "images" / "synthetic" / "img1_object.png"
    Image.fromarray(rgb).save(png)
    os.utime(png, ns=(1, 1))  # an mtime that surely differs
    assert open_cache(tiny) is None  # stale
    stale = BrodenDataset(tiny)
    assert stale.cache is None
    np.testing.assert_array_equal(stale[1]["labels"][1].numpy(), new)
    with pytest.raises(InputError, match="not a fresh decoded cache"):
        BrodenDataset(tiny, cache=first)
    second = build_cache(tiny, progress=False)
    assert second != first
    ds = BrodenDataset(tiny)
    assert ds.cache is not None and ds.cache.path == second
    np.testing.assert_array_equal(ds[1]["labels"][1].numpy(), new)
    # a change to a table alone also changes the fingerprint
    (tiny / "label.csv").write_text((tiny / "label.csv").read_text().replace("wall", "Wall"))
    assert source_fingerprint(tiny) != second.name


def test_interrupted_build_is_not_reused(tiny, cache_dir, monkeypatch):
    real = cache_mod.decode_label_png
    calls = {"n": 0, "partial": []}

    def failing(path):
        calls["n"] += 1
        if calls["n"] > 8:  # rows 0 and 1 decoded (7 planes), crash inside row 2
            calls["partial"] = sorted(p.name for p in (cache_dir / "decoded").iterdir())
            raise RuntimeError("simulated crash")
        return real(path)

    monkeypatch.setattr(cache_mod, "decode_label_png", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_cache(tiny, progress=False, workers=1)
    # the crash came midway, with a temporary build directory in place
    assert len(calls["partial"]) == 1 and calls["partial"][0].startswith(".tmp-")
    assert not any((cache_dir / "decoded").iterdir())  # and the temporary directory went away
    assert open_cache(tiny) is None
    assert BrodenDataset(tiny).cache is None
    target = cache_dir / "decoded" / source_fingerprint(tiny)
    assert not target.exists()
    # a killed build can leave a half-written target without meta.json: never read, replaced
    target.mkdir(parents=True)
    np.save(target / "images.npy", np.zeros((7, 3, 8, 8), dtype=np.uint8))
    (cache_dir / "decoded" / f".tmp-{target.name[:16]}-leftover").mkdir()
    assert open_cache(tiny) is None
    monkeypatch.setattr(cache_mod, "decode_label_png", real)
    assert build_cache(tiny, progress=False) == target
    ds, off = BrodenDataset(tiny), BrodenDataset(tiny, cache="off")
    assert ds.cache is not None
    for i in range(len(off)):
        _items_equal(ds[i], off[i])


def _small_writer(root: Path, sizes: list[int], big_id: int = 2) -> Path:
    w = BrodenWriter(root, ["color", "object"])
    w.add_label(1, "red")
    w.add_label(big_id, "big")
    rng = np.random.default_rng(1)
    for k, s in enumerate(sizes):
        plane = rng.choice(np.array([1, big_id]), size=(2, 2))
        w.add_image(f"im{k}", rng.integers(0, 256, (s, s, 3), dtype=np.uint8), layers={"object": [plane]})
    w.close()
    return root


def test_images_must_share_one_size(tmp_path, cache_dir):
    root = _small_writer(tmp_path / "b", [4, 4, 6, 4])
    with pytest.raises(InputError) as e:
        build_cache(root, progress=False)
    assert "line 4" in str(e.value) and "synthetic/im2.png" in str(e.value)
    assert not (cache_dir / "decoded" / source_fingerprint(root)).exists()


def test_ids_above_32767_use_int32(tmp_path, cache_dir):
    root = _small_writer(tmp_path / "b", [4, 4], big_id=40000)
    path = build_cache(root, progress=False)
    assert np.load(path / "planes.npy").dtype == np.int32
    ds, off = BrodenDataset(root), BrodenDataset(root, cache="off")
    for i in range(2):
        _items_equal(ds[i], off[i])
    assert int(ds.get_batch([0, 1])["labels"].max()) == 40000


def _fake_tmp(base: Path, name: str, age_s: float = 0.0, owner: dict | None = None, lock: bool = False) -> Path:
    d = base / name
    d.mkdir(parents=True)
    (d / "images.npy").write_bytes(b"\0" * 64)
    if lock:
        (d / ".lock").touch()
    if owner is not None:
        (d / "owner.json").write_text(json.dumps(owner))
    if age_s:
        t = time.time() - age_s
        for p in [*d.iterdir(), d]:
            os.utime(p, (t, t))
    return d


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)


def test_stale_temporary_builds_are_removed(tiny, cache_dir):
    import fcntl
    import socket

    fp = source_fingerprint(tiny)
    base = cache_dir / "decoded"
    host = socket.gethostname()
    old = _fake_tmp(base, f".tmp-{fp[:16]}-old", age_s=2 * 3600)                  # killed long ago
    fresh = _fake_tmp(base, f".tmp-{fp[:16]}-fresh", age_s=60)                    # maybe just starting
    dead = _fake_tmp(base, f".tmp-{fp[:16]}-dead", owner={"host": host, "pid": _dead_pid()})
    unlocked = _fake_tmp(base, f".tmp-{fp[:16]}-unlocked", lock=True, owner={"host": "elsewhere", "pid": 1})
    live = _fake_tmp(base, f".tmp-{fp[:16]}-live", age_s=2 * 3600, lock=True,
                     owner={"host": host, "pid": os.getpid()})
    other = _fake_tmp(base, ".tmp-0000000000000000-old", age_s=2 * 3600)         # another target's
    fd = os.open(live / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live build holds its lock, however old its files
    try:
        path = build_cache(tiny, progress=False)
    finally:
        os.close(fd)
    assert not old.exists() and not dead.exists() and not unlocked.exists()
    assert fresh.is_dir() and live.is_dir() and other.is_dir()
    assert path.is_dir() and not (path / ".lock").exists() and not (path / "owner.json").exists()
    assert sorted(p.name for p in base.iterdir()) == sorted([fp, fresh.name, live.name, other.name])
    # once its lock is free, the old "live" one is stale too (and an up-to-date cache still cleans up)
    assert build_cache(tiny, progress=False) == path
    assert not live.exists() and fresh.is_dir()


def test_a_build_killed_hard_is_cleaned_up_but_a_running_one_is_not(tiny, cache_dir):
    base = cache_dir / "decoded"
    script = textwrap.dedent(f"""
        import time, broden.cache as c
        real = c.decode_label_png
        def slow(path):
            time.sleep(30)
            return real(path)
        c.decode_label_png = slow
        c.build_cache({str(tiny)!r}, progress=False, workers=1)
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.time() + 20
        tmps: list[Path] = []
        while time.time() < deadline and not (tmps and (tmps[0] / "owner.json").is_file()):
            tmps = list(base.glob(".tmp-*")) if base.is_dir() else []
            time.sleep(0.05)
        assert len(tmps) == 1 and f"-{proc.pid}-" in tmps[0].name
        time.sleep(0.2)  # owner.json is written after the lock is taken
        fp = source_fingerprint(tiny)
        assert cache_mod.remove_stale_builds(base, fp, stale_after=0) == []  # running: kept even at age 0
        assert tmps[0].is_dir()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert tmps[0].is_dir()  # SIGKILL leaves it behind ...
        assert cache_mod.remove_stale_builds(base, fp) == [tmps[0]]  # ... fresh, but its owner is gone
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
