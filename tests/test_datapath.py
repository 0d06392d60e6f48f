"""The data path: decode once per dataset, never twice per run, threads ahead of compute, same bytes out."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import broden.format as format_mod
from broden.cache import build_cache, open_cache, source_fingerprint
from broden.dataset import BrodenDataset, collate
from broden.loader import Prefetcher, iter_batches, thread_plan, torch_threads
from broden_fixtures import make_tiny_broden
from dissect.results import LABEL_STRIP_FILE, LAYER_FILES
from dissect.runner import run
from test_pipeline import LAYERS, ConceptNet, make_concept_broden

FILES = (*LAYER_FILES, LABEL_STRIP_FILE)
OPTS = dict(layers=LAYERS, top_fraction=0.2, normalize="none", top_k=3, batch_size=4, quiet=True)


@pytest.fixture
def root(tmp_path) -> Path:
    return make_concept_broden(tmp_path / "broden", n=10)


@pytest.fixture
def decoded(monkeypatch) -> list[str]:
    """Every image decode (all paths go through broden.format.decode_image), by file name."""
    seen: list[str] = []
    real = format_mod.decode_image

    def counting(path):
        seen.append(Path(path).name)  # list.append is atomic: loader threads may call this at once
        return real(path)

    monkeypatch.setattr(format_mod, "decode_image", counting)
    return seen


def same_outputs(a: Path, b: Path) -> None:
    for name in LAYERS:
        for f in FILES:
            assert (a / name / f).read_bytes() == (b / name / f).read_bytes(), (a, b, name, f)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for s in (sa, sb):
        s.pop("timings")
        for k in ("threads", "loader_threads", "keep_activations"):
            s["options"].pop(k)
    assert sa == sb


def leftovers(cache_dir: Path) -> list[str]:
    base = cache_dir / "decoded"
    return sorted(p.name for p in base.iterdir() if p.name.startswith(".tmp-")) if base.is_dir() else []


# ---------------------------------------------------------------- decode once

def test_first_run_writes_the_cache_and_a_second_run_decodes_nothing(root, tmp_path, decoded):
    cache_dir = tmp_path / "cache"
    assert open_cache(root, cache_dir) is None
    first = run(ConceptNet().eval(), root, tmp_path / "a", cache_dir=str(cache_dir), keep_activations="no", **OPTS)
    assert not first.reused
    # two passes (activations recomputed), yet every image decoded exactly once
    assert sorted(decoded) == sorted(f"im{k}.png" for k in range(10))
    cache = open_cache(root, cache_dir)
    assert cache is not None and cache.path == cache_dir / "decoded" / source_fingerprint(root)
    assert leftovers(cache_dir) == []
    decoded.clear()
    run(ConceptNet().eval(), root, tmp_path / "b", cache_dir=str(cache_dir), keep_activations="no", **OPTS)
    assert decoded == []  # the second run reads decoded arrays only
    run(ConceptNet().eval(), root, tmp_path / "off", cache_dir=str(cache_dir), decoded_cache="off", **OPTS)
    # off keeps its meaning: each of the 3 passes (stage 3: label strips) decodes (+ row 0 for the shape probe)
    assert len(decoded) == 31
    same_outputs(tmp_path / "a", tmp_path / "b")
    same_outputs(tmp_path / "a", tmp_path / "off")


@pytest.mark.parametrize("threads,loader_threads,keep", [(1, 1, "no"), (2, 3, "yes"), (1, 4, "no")])
def test_results_are_byte_identical_with_any_cache_state_and_thread_count(root, tmp_path, threads,
                                                                          loader_threads, keep):
    cache_dir = tmp_path / "cache"
    ref = tmp_path / "ref"
    run(ConceptNet().eval(), root, ref, decoded_cache="off", threads=1, loader_threads=1, keep_activations="no",
        cache_dir=str(cache_dir), **OPTS)
    exec_opts = dict(threads=threads, loader_threads=loader_threads, keep_activations=keep,
                     cache_dir=str(cache_dir))
    run(ConceptNet().eval(), root, tmp_path / "cold", **exec_opts, **OPTS)     # writes the cache as it streams
    assert open_cache(root, cache_dir) is not None
    run(ConceptNet().eval(), root, tmp_path / "warm", **exec_opts, **OPTS)     # reads it
    run(ConceptNet().eval(), root, tmp_path / "built", decoded_cache="build", force=True, **exec_opts, **OPTS)
    for out in ("cold", "warm", "built"):
        same_outputs(ref, tmp_path / out)
    used = json.loads((tmp_path / "cold" / "summary.json").read_text())["options"]
    assert (used["threads"], used["loader_threads"]) == (threads, loader_threads)  # recorded as used


def test_a_subset_run_decodes_once_into_a_scratch_store_that_goes_away(root, tmp_path, decoded):
    cache_dir = tmp_path / "cache"
    run(ConceptNet().eval(), root, tmp_path / "sub", cache_dir=str(cache_dir), keep_activations="no", limit=5,
        **OPTS)
    assert sorted(decoded) == sorted(f"im{k}.png" for k in range(5))  # two passes, one decode each
    # the pass did not cover index.csv: no cache is kept, and the scratch store is gone
    assert open_cache(root, cache_dir) is None
    assert leftovers(cache_dir) == []
    run(ConceptNet().eval(), root, tmp_path / "ref", cache_dir=str(cache_dir), decoded_cache="off", limit=5,
        **OPTS)
    same_outputs(tmp_path / "sub", tmp_path / "ref")


def test_staged_batches_equal_decoding(tmp_path, monkeypatch):
    monkeypatch.setenv("DISSECT_CACHE_DIR", str(tmp_path / "cache"))
    tiny = make_tiny_broden(tmp_path / "tiny")
    off = BrodenDataset(tiny, categories=["part", "scene"], cache="off")
    ds = BrodenDataset(tiny, categories=["part", "scene"], write_cache=True)
    assert ds.cache is None and ds._writer is not None
    # scattered, repeated and negative indices, then the rest: what collate of decoded items gives
    for order in ([5, 0, 6, 5], [-1, 2], [1, 3, 4]):
        got, want = ds.get_batch(order), collate([off[i] for i in order])
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (order, k)
    # every row read once: the staging became the decoded cache, of every category
    assert ds.cache is not None and ds._writer is None
    assert ds.cache.path == build_cache(tiny, progress=False)  # up to date: the same directory
    every = BrodenDataset(tiny, cache="off")
    full = BrodenDataset(tiny)
    for i in range(len(every)):
        assert torch.equal(full[i]["labels"], every[i]["labels"])


def test_a_killed_first_pass_leaves_no_cache_to_reuse(root, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"

    class Killed(RuntimeError):
        pass

    real, calls = format_mod.decode_image, []

    def dies_at_the_sixth(path):
        calls.append(path)
        if len(calls) == 6:
            raise Killed("killed while decoding")
        return real(path)

    monkeypatch.setattr(format_mod, "decode_image", dies_at_the_sixth)
    with pytest.raises(Killed):
        run(ConceptNet().eval(), root, tmp_path / "out", cache_dir=str(cache_dir), **OPTS)
    assert open_cache(root, cache_dir) is None
    assert leftovers(cache_dir) == []  # the staging directory went with the failed run


def test_a_hard_killed_build_is_never_read_and_the_next_run_cleans_it(tmp_path):
    root = make_concept_broden(tmp_path / "broden40", n=40)  # more rows than the loader reads ahead
    cache_dir = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_pipeline import ConceptNet, LAYERS
        from dissect.runner import run
        model = ConceptNet().eval()
        calls = []
        def hook(*a):
            calls.append(1)
            if len(calls) == 3:  # probe, batch 0, then batch 1 hangs: rows 0-15 at most are staged
                print("staged", flush=True)
                time.sleep(60)
        model.units.register_forward_hook(hook)
        run(model, {str(root)!r}, {str(tmp_path / 'out')!r}, cache_dir={str(cache_dir)!r}, layers=LAYERS,
            normalize="none", batch_size=4, loader_threads=1, quiet=True)
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "staged"
        tmps = leftovers(cache_dir)
        assert len(tmps) == 1 and f"-{proc.pid}-" in tmps[0]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert leftovers(cache_dir) == tmps  # SIGKILL leaves it behind ...
    assert open_cache(root, cache_dir) is None  # ... and it is never read as a cache
    run(ConceptNet().eval(), root, tmp_path / "again", cache_dir=str(cache_dir), **OPTS)
    assert open_cache(root, cache_dir) is not None
    assert leftovers(cache_dir) == []  # its owner is dead: the next build removed it


def test_short_disk_space_warns_with_the_size_and_runs_without_the_cache(root, tmp_path, monkeypatch, caplog,
                                                                         decoded):
    import broden.cache_writer as writer_mod

    cache_dir = tmp_path / "cache"
    real = writer_mod.shutil.disk_usage
    monkeypatch.setattr(writer_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=10_000))
    with caplog.at_level(logging.WARNING):
        run(ConceptNet().eval(), root, tmp_path / "short", cache_dir=str(cache_dir), keep_activations="no", **OPTS)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "needs" in warning and "MiB" in warning and "only 0.0 MiB are free" in warning
    assert "Running without the decoded cache" in warning
    assert open_cache(root, cache_dir) is None and leftovers(cache_dir) == []
    assert len(decoded) == 31  # without room, each of the 3 passes decodes (+ row 0 for the shape probe)
    run(ConceptNet().eval(), root, tmp_path / "ref", cache_dir=str(cache_dir), decoded_cache="off", **OPTS)
    same_outputs(tmp_path / "short", tmp_path / "ref")


# ---------------------------------------------------------------- stale reuse (issue 13, item 6)

def _edit_keeping_size_and_mtime(png: Path, ids: np.ndarray) -> None:
    """Rewrite a label PNG with other ids, same byte size and same mtime (uncompressed PNGs of one shape)."""
    from PIL import Image

    from broden.writer import encode_label_png

    st = png.stat()
    Image.fromarray(encode_label_png(ids)).save(png, compress_level=0)
    assert png.stat().st_size == st.st_size
    os.utime(png, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_content_fingerprint_catches_an_edit_that_keeps_size_and_mtime(root, tmp_path):
    from PIL import Image

    from broden.writer import encode_label_png

    cache_dir = tmp_path / "cache"
    png = root / "images" / "synthetic" / "im1_color.png"
    old = np.asarray(Image.open(png))
    # store it uncompressed first, so that an edit can keep the byte size
    Image.fromarray(old).save(png, compress_level=0)
    ref = run(ConceptNet().eval(), root, tmp_path / "ref", cache_dir=str(cache_dir), **OPTS)
    stat_fp, content_fp = source_fingerprint(root), source_fingerprint(root, mode="content")
    assert stat_fp != content_fp  # the mode is part of the key
    assert source_fingerprint(root, mode="content", workers=1) == content_fp

    ids = np.ones(old.shape[:2], dtype=np.int64)  # every pixel red now
    _edit_keeping_size_and_mtime(png, ids)
    assert source_fingerprint(root) == stat_fp  # stat mode cannot tell
    assert source_fingerprint(root, mode="content") != content_fp  # content mode can
    assert np.array_equal(np.asarray(Image.open(png)), encode_label_png(ids))

    # stat (default): the finished run and the decoded cache are reused, stale
    again = run(ConceptNet().eval(), root, tmp_path / "ref", cache_dir=str(cache_dir), **OPTS)
    assert again.reused
    stale = BrodenDataset(root, cache=cache_dir)
    assert stale.cache is not None and not torch.equal(stale[1]["labels"][0], torch.ones(8, 8, dtype=torch.int32))
    # content: another dataset fingerprint, so nothing stale is reused: a fresh cache and fresh results
    fresh = run(ConceptNet().eval(), root, tmp_path / "ref", cache_dir=str(cache_dir), fingerprint="content",
                **OPTS)
    assert not fresh.reused and fresh.summary_json["run_key"] != ref.summary_json["run_key"]
    assert fresh.summary_json["dataset"]["fingerprint"] == source_fingerprint(root, mode="content")
    content_ds = BrodenDataset(root, cache=cache_dir, fingerprint="content")
    assert content_ds.cache is not None and content_ds.cache.path.name == content_ds.fingerprint
    assert torch.equal(content_ds[1]["labels"][0], torch.ones(8, 8, dtype=torch.int32))
    # stat + --force: recomputed from the files, and the stale decoded cache rebuilt
    forced = run(ConceptNet().eval(), root, tmp_path / "forced", cache_dir=str(cache_dir), force=True, **OPTS)
    assert forced.summary_json["run_key"] == ref.summary_json["run_key"]  # stat mode: the same key as before the edit
    rebuilt = BrodenDataset(root, cache=cache_dir)
    assert rebuilt.cache is not None
    assert torch.equal(rebuilt[1]["labels"][0], torch.ones(8, 8, dtype=torch.int32))
    tally = [(d / "units" / "tally.csv").read_bytes() for d in (tmp_path / "ref", tmp_path / "forced")]
    assert tally[0] == tally[1]  # the same edited data through either mode: the same numbers ...
    assert fresh.result.layer("units").truth.tolist() != ref.result.layer("units").truth.tolist()  # ... not the old


# ---------------------------------------------------------------- the loader

def test_prefetcher_keeps_order_and_bounds_its_look_ahead():
    rng = np.random.default_rng(0)
    delays = rng.uniform(0, 0.01, size=40)
    started: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(delays[i])  # later items often finish first
        return i * i

    got = []
    with Prefetcher(work, range(40), threads=4, depth=6) as it:
        for i, v in enumerate(it):
            got.append(v)
            with lock:
                assert len(started) <= i + 1 + 6  # never more than depth ahead of the consumer
    assert got == [i * i for i in range(40)]
    assert list(Prefetcher(work, range(5), threads=0)) == [0, 1, 4, 9, 16]  # in the caller's thread


def test_prefetcher_counts_the_time_the_caller_waits():
    gate = threading.Event()

    def slow_first(i: int) -> int:
        if i == 0:
            gate.wait(5)  # released 0.2 s after the caller starts waiting for it
        return i

    it = Prefetcher(slow_first, range(4), threads=1, depth=4)
    threading.Timer(0.2, gate.set).start()
    assert next(it) == 0
    # blocked on the first result until the gate opened, 0.2 s after the timer started; the clock starts
    # when next() is called, a moment later (longer on a busy machine), hence the margin
    assert 0.1 <= it.waited < 5
    time.sleep(0.1)  # the rest are done meanwhile: taking them costs no wait
    before = it.waited
    assert list(it) == [1, 2, 3]
    assert it.waited - before < 0.05
    inline = Prefetcher(lambda i: time.sleep(0.05) or i, range(3), threads=0)
    assert list(inline) == [0, 1, 2] and inline.waited >= 0.15  # in the caller's thread: all of fn's time


def test_prefetcher_raises_in_order_and_stops_the_rest():
    done: list[int] = []

    def work(i: int) -> int:
        if i == 3:
            raise ValueError("bad item 3")
        time.sleep(0.002)
        done.append(i)
        return i

    it = Prefetcher(work, range(1000), threads=2, depth=4)
    assert [next(it) for _ in range(3)] == [0, 1, 2]  # the items before it come out first
    with pytest.raises(ValueError, match="bad item 3"):
        next(it)
    assert len(done) < 20  # queued work was cancelled, not run to the end
    with pytest.raises(StopIteration):
        next(it)


def test_iter_batches_equals_get_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("DISSECT_CACHE_DIR", str(tmp_path / "cache"))
    tiny = make_tiny_broden(tmp_path / "tiny")
    ds = BrodenDataset(tiny, cache="off")
    ranges = [(0, 3), (3, 5), (5, 7)]
    with iter_batches(ds, ranges, threads=3) as it:
        got = list(it)
    assert [s for s, _ in got] == [0, 3, 5]
    for (s, e), (_, batch) in zip(ranges, got):
        want = ds.get_batch(np.arange(s, e))
        assert all(torch.equal(batch[k], want[k]) for k in want)


def test_thread_plan_and_scoped_torch_threads():
    assert thread_plan(0, 0, "cpu", cores=2, idle=1.0) == (2, 1)
    assert thread_plan(0, 0, "cpu", cores=16, idle=0.98) == (16, 4)
    # a machine half busy with other work: torch takes the idle cores only, never fewer than one
    assert thread_plan(0, 0, "cpu", cores=2, idle=0.45) == (1, 1)
    assert thread_plan(0, 0, "cpu", cores=16, idle=0.5) == (8, 4)
    assert thread_plan(0, 0, "cpu", cores=4, idle=0.0) == (1, 1)
    assert thread_plan(3, 2, "cpu", cores=16) == (3, 2)  # explicit counts win
    assert thread_plan(0, 0, "cpu", cores=16, idle=1.0, processes=4) == (4, 1)  # each rank its share
    assert thread_plan(0, 0, "cpu", cores=2, idle=1.0, processes=3) == (1, 1)
    torch_n, loader_n = thread_plan(0, 0, "cuda", cores=16)
    assert loader_n == 8 and torch_n + loader_n <= 16  # on a GPU the CPU's job is loading
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_execution_flags_are_declared_once_and_checked(tmp_path, capsys):
    from broden.errors import InputError
    from dissect.cli import main
    from dissect.config import DissectConfig, RunSettings

    for flag, value in (("--threads", "-1"), ("--loader-threads", "-2")):
        assert main(["run", str(tmp_path / "m.pth"), "--dataset", str(tmp_path), "--out", str(tmp_path / "o"),
                     flag, value]) == 2
        assert f"{flag} {value}" in capsys.readouterr().err  # the message names the flag
    assert main(["run", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "--threads N" in help_text and "--loader-threads N" in help_text and "--fingerprint" in help_text

    assert DissectConfig.flags()["threads"] == "--threads"
    assert DissectConfig.flags()["loader_threads"] == "--loader-threads"
    assert RunSettings.flags()["fingerprint"] == "--fingerprint"
    assert not {"threads", "loader_threads"} & DissectConfig.result_fields()  # they never change a number
    with pytest.raises(InputError, match=r"--threads -1 \(option threads\)"):
        DissectConfig(threads=-1).validate()
    with pytest.raises(InputError, match="--fingerprint 'sha'"):
        RunSettings(fingerprint="sha").validate()
