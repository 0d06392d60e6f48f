"""Cold dissection vs warm dissection vs a bare forward pass, AlexNet conv1-conv5, side by side in one run.

    python benchmarks/dissect_speed.py [--n 384] [--repeat 3] [--device auto] [--batch-size 64] [--dir DIR]
                                       [--threads N] [--loader-threads N] [--keep-activations auto]
                                       [--pool P] [--phases cold,warm,bare,memory] [--sync-check N] [--json PATH]

Generates (or reuses, in --dir) a Broden-format set of --n rows, each with its
own real files written by broden.writer: a 224 px JPEG image and three 112 px
label PNGs (color, object, part) plus an image-level scene label. With --pool
P < n, only P rows are encoded and the others are hard links to them under
their own names (the content repeats every P rows; every row is still read
and decoded on its own): a 63,305-row set is made in seconds. Then, per
repeat, each in a fresh process (so peak RSS is per phase):

- cold: `dissect.run` with an empty cache dir: the first pass decodes the JPEG
  and PNG files (the OS page cache already holds them: this measures decoding,
  not the disk) and writes the decoded cache as it goes;
- warm: the same run again: the decoded cache is there;
- bare: a forward pass of the whole AlexNet over batches read from that cache
  (after one untimed warm-up pass), the engine's floor;
- memory: the same forward pass over images already in one tensor in memory
  (copied from the cache before the clock starts): bare / memory is what the
  data path costs a pass, and the dissections report how long their passes
  waited for the loader (timings' data_wait).

Prints the median over repeats, images/s, peak RSS (and peak GPU memory on
CUDA) and the load average around each phase, then the ratios against the
targets (warm <= 1.2x bare, cold <= 1.5x warm on CPU; warm <= 1.5x bare and
n images in <= 30 s on a GPU). --phases leaves phases out (warm needs a cold
phase before it in the same repeat, bare and memory a cache). --sync-check N (CUDA only)
dissects the first N rows once more with torch.cuda.set_sync_debug_mode("warn")
and counts the host synchronisations per batch and the lines that cause them.
--json PATH writes every figure. The model is torchvision AlexNet with random
weights (weights=None, seed 0).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYERS = ["features.0", "features.3", "features.6", "features.8", "features.10"]
CATS = ["color", "object", "part", "scene"]
TARGETS = {"cpu": {"warm / bare": 1.2, "cold / warm": 1.5}, "cuda": {"warm / bare": 1.5}}
GPU_WARM_SECONDS_PER_63305 = 30.0  # issue 15: the whole of Broden through conv1-conv5 in 30 s


def blobs(rng: np.random.Generator, size: int, ids: np.ndarray, cells: int) -> np.ndarray:
    """A (size, size) label map of rectangular cells, each an id from `ids` (0 = unlabeled allowed)."""
    grid = rng.choice(ids, size=(cells, cells))
    return np.kron(grid, np.ones((size // cells + 1, size // cells + 1), dtype=grid.dtype))[:size, :size]


def make_dataset(root: Path, n: int, seed: int = 0, pool: int | None = None) -> Path:
    """A Broden dir of n rows, each with its own JPEG and PNG files; reused when already made.

    With pool < n, rows past the pool are hard links to row k % pool under their own names.
    """
    from broden.writer import BrodenWriter

    done = root / "bench.json"
    encoded = n if pool is None else min(n, pool)
    spec = {"n": n, "seed": seed, "files": "per-row", "encoded": encoded}
    if done.is_file() and json.loads(done.read_text()) == spec:
        return root
    if root.exists():
        shutil.rmtree(root)
    rng = np.random.default_rng(seed)
    w = BrodenWriter(root, CATS)
    for i in range(1, 71):
        w.add_label(i, f"label{i}")
    ramp = np.linspace(0, 255, 224, dtype=np.float32)
    for k in range(encoded):
        base = rng.integers(0, 256, size=3).astype(np.float32)
        # smooth content plus noise: JPEG sizes and decode costs like photographs', not like pure noise
        img = (base + ramp[None, :, None] * 0.5 + rng.normal(0, 12, (224, 224, 3))).clip(0, 255).astype(np.uint8)
        color = blobs(rng, 112, np.arange(1, 11), 8)
        obj = blobs(rng, 112, np.concatenate([[0], np.arange(11, 41)]), 4)
        part = blobs(rng, 112, np.concatenate([[0] * 4, np.arange(41, 61)]), 16)
        w.add_image(f"b{k:05d}", img, layers={"color": [color], "object": [obj], "part": [part]},
                    image_labels={"scene": [61 + k % 10]}, image_format="jpg")
    w.close()
    if encoded < n:
        _link_rows(root, n, encoded)
    done.write_text(json.dumps(spec))
    return root


def _link_rows(root: Path, n: int, encoded: int) -> None:
    """Rows encoded..n-1 of index.csv as hard links (copies where links fail) to row k % encoded's files."""
    import csv

    index = root / "index.csv"
    with index.open(newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    images = root / "images"
    for k in range(encoded, n):
        src = body[k % encoded]
        old, new = f"b{k % encoded:05d}", f"b{k:05d}"
        row = []
        for cell in src:
            if old in cell and "/" in cell:  # a file name: link it under the new row's name
                target = images / cell.replace(old, new)
                try:
                    os.link(images / cell, target)
                except OSError:
                    shutil.copyfile(images / cell, target)
                cell = cell.replace(old, new)
            row.append(cell)
        body.append(row)
    tmp = index.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([header, *body])
    os.replace(tmp, index)


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(device):
    import torch
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.alexnet(weights=None).eval().to(device)


def phase(args: argparse.Namespace) -> dict:
    """One measured phase in this process: 'bare', 'memory', 'cold', 'warm' or 'sync'."""
    import torch

    from broden._progress import set_quiet
    from broden.dataset import BrodenDataset
    from broden.loader import thread_plan
    from dissect.devices import resolve_device

    set_quiet(True)
    device = resolve_device(args.device)
    torch_n, loader_n = thread_plan(args.threads, args.loader_threads, device)
    torch.set_num_threads(torch_n)
    model = _model(device)
    with torch.no_grad():  # one-time kernel and allocator setup, outside every timing
        model(torch.zeros(args.batch_size, 3, 224, 224, device=device))
    out: dict = {"threads": torch_n, "loader_threads": loader_n}
    if args.phase == "bare":
        from broden.loader import iter_batches
        from dissect.preprocess import preprocess
        from dissect.models import NORMALIZATIONS

        ds = BrodenDataset(args.root, cache=args.cache_dir)
        if ds.cache is None:
            raise SystemExit("bare: no decoded cache (run the warm phase first)")
        ranges = [(s, min(s + args.batch_size, len(ds))) for s in range(0, len(ds), args.batch_size)]

        def forward_pass() -> float:
            _sync(device)
            t = time.perf_counter()
            with torch.no_grad(), iter_batches(ds, ranges, loader_n, pin_memory=device.type == "cuda") as it:
                for _, batch in it:
                    model(preprocess(batch["image"].to(device, non_blocking=True), NORMALIZATIONS["imagenet"], None))
            _sync(device)
            return time.perf_counter() - t

        forward_pass()  # warm-up: page cache of the arrays
        out["seconds"] = forward_pass()
    elif args.phase == "memory":
        from dissect.preprocess import preprocess
        from dissect.models import NORMALIZATIONS

        ds = BrodenDataset(args.root, cache=args.cache_dir)
        if ds.cache is None:
            raise SystemExit("memory: no decoded cache (run the warm phase first)")
        images = ds.get_batch(np.arange(len(ds)))["image"].to(device)  # (N, 3, H, W) uint8, not timed

        def memory_pass() -> float:
            _sync(device)
            t = time.perf_counter()
            with torch.no_grad():
                for s in range(0, len(ds), args.batch_size):
                    model(preprocess(images[s:s + args.batch_size], NORMALIZATIONS["imagenet"], None))
            _sync(device)
            return time.perf_counter() - t

        memory_pass()  # warm-up, as for bare
        out["seconds"] = memory_pass()
    elif args.phase == "sync":
        out.update(_count_syncs(args, model, device))
    else:
        import dissect

        shutil.rmtree(args.out, ignore_errors=True)  # a finished run there would be reused (and --force rebuilds)
        t = time.perf_counter()
        res = dissect.run(model, args.root, args.out, layers=LAYERS, batch_size=args.batch_size,
                          device=str(device), normalize="imagenet", keep_activations=args.keep_activations,
                          cache_dir=str(args.cache_dir), threads=args.threads, loader_threads=args.loader_threads,
                          quiet=True)
        _sync(device)
        out["seconds"] = time.perf_counter() - t
        out["timings"] = res.result.timings
    out["rss_gib"] = _rss_gib()
    if device.type == "cuda":
        out["gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        out["device"] = torch.cuda.get_device_name(device)
    else:
        out["device"] = f"CPU, {os.cpu_count()} cores visible"
    return out


def _count_syncs(args: argparse.Namespace, model, device) -> dict:
    """Dissect the first --sync-check rows with CUDA's sync debug mode on; syncs per batch and their lines."""
    import collections
    import warnings

    import torch

    import dissect

    if device.type != "cuda":
        raise SystemExit("--sync-check needs a CUDA device")
    shutil.rmtree(args.out, ignore_errors=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            dissect.run(model, args.root, args.out, layers=LAYERS, batch_size=args.batch_size, device=str(device),
                        normalize="imagenet", keep_activations=args.keep_activations, cache_dir=str(args.cache_dir),
                        limit=args.sync_check, threads=args.threads, loader_threads=args.loader_threads, quiet=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    where = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    batches = 2 * -(-args.sync_check // args.batch_size)  # stage 1 and stage 2
    return {"syncs": len(syncs), "batches": batches, "syncs_per_batch": len(syncs) / batches,
            "sync_lines": dict(where.most_common(20))}


def run_phase(args: argparse.Namespace, name: str, cache_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--phase", name, "--root", str(args.root), "--cache-dir", str(cache_dir),
           "--out", str(args.dir / f"out-{name}"), "--device", args.device, "--batch-size", str(args.batch_size),
           "--threads", str(args.threads), "--loader-threads", str(args.loader_threads),
           "--keep-activations", args.keep_activations, "--sync-check", str(args.sync_check)]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"phase {name} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load"] = (load + os.getloadavg()[0]) / 2  # 1-min load average around the phase
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=384, help="images, each with its own files (default 384)")
    p.add_argument("--repeat", type=int, default=3, help="repeats of the three phases; medians shown (default 3)")
    p.add_argument("--dir", type=Path, default=Path("/tmp/dissect_speed"), help="work dir (dataset reused)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--keep-activations", choices=("auto", "yes", "no"), default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the engine's auto choice)")
    p.add_argument("--loader-threads", type=int, default=0, help="loader threads (0: the engine's auto choice)")
    p.add_argument("--pool", type=int, default=None,
                   help="encode only this many rows; the others link to them (default: encode all --n)")
    p.add_argument("--phases", default="cold,warm,bare,memory",
                   help="comma-separated subset of cold,warm,bare,memory, in that order (default all four)")
    p.add_argument("--sync-check", type=int, default=0,
                   help="CUDA: count host syncs while dissecting the first N rows (default 0: off)")
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    p.add_argument("--phase", choices=("bare", "memory", "cold", "warm", "sync"), help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase:
        print(json.dumps(phase(args)))
        return 0

    phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    if not phases or any(x not in ("cold", "warm", "bare", "memory") for x in phases):
        p.error(f"--phases: expected a comma-separated subset of cold,warm,bare,memory, got {args.phases!r}")
    if "warm" in phases and "cold" not in phases:
        p.error("--phases: warm needs cold before it (cold builds the decoded cache)")
    args.dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    args.root = make_dataset(args.dir / "broden", args.n, pool=args.pool)
    made = time.perf_counter() - t
    print(f"dataset: {args.n} rows of real JPEG + PNG files at {args.root} "
          f"({made:.1f} s to make or reuse{'' if not args.pool or args.pool >= args.n else f'; {args.pool} encoded, the rest linked'})",
          flush=True)
    report: dict = {"n": args.n, "pool": args.pool, "batch_size": args.batch_size, "phases": {}, "dataset_seconds": made}
    results: dict[str, list[dict]] = {k: [] for k in phases}
    cache_dir = args.dir / "cache"
    for r in range(args.repeat):
        shutil.rmtree(cache_dir, ignore_errors=True)  # cold: no decoded cache at all
        for name in phases:
            res = run_phase(args, name, cache_dir)
            results[name].append(res)
            print(f"  repeat {r + 1}: {name:5s} {res['seconds']:7.2f} s  (load {res['load']:.2f})", flush=True)
    med = {k: statistics.median(x["seconds"] for x in v) for k, v in results.items()}
    first = results[phases[0]][0]
    cuda = not first["device"].startswith("CPU")
    print(f"device: {first['device']}; torch threads {first['threads']}, loader threads {first['loader_threads']}; "
          f"batch size {args.batch_size}; {args.repeat} repeat(s), medians")
    print(f"{'':34s}{'seconds':>9s}{'images/s':>10s}{'peak RSS':>10s}{'peak GPU':>10s}{'load':>7s}")
    rows = (("cold (JPEG/PNG, writes the cache)", "cold"), ("warm (decoded cache)", "warm"),
            ("bare forward (decoded cache)", "bare"), ("bare forward (images in memory)", "memory"))
    for label, key in rows:
        if key not in results:
            continue
        rss = max(x["rss_gib"] for x in results[key])
        gpu = max(x.get("gpu_peak_gib", 0.0) for x in results[key])
        load = statistics.median(x["load"] for x in results[key])
        gpu_text = f"{gpu:9.2f}G" if cuda else f"{'-':>10s}"
        print(f"{label:34s}{med[key]:9.2f}{args.n / med[key]:10.1f}{rss:9.2f}G{gpu_text}{load:7.2f}")
        report["phases"][key] = {"median_seconds": med[key], "images_per_s": args.n / med[key],
                                 "peak_rss_gib": rss, "peak_gpu_gib": gpu if cuda else None,
                                 "load": load, "repeats": results[key]}
    for key in ("warm", "cold"):
        if key in results and results[key][0].get("timings"):
            stages = {k: statistics.median(x["timings"][k] for x in results[key]) for k in results[key][0]["timings"]}
            stages.pop("data_wait", None)  # not a stage: printed below
            print(f"{key} stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()))
            report["phases"][key]["stages"] = stages
            break
    for key in ("cold", "warm"):
        if key in results and "data_wait" in results[key][0].get("timings", {}):
            wait = statistics.median(x["timings"]["data_wait"] for x in results[key])
            report["phases"][key]["data_wait_seconds"] = wait
            print(f"{key}: its passes waited {wait:.2f} s for the loader ({wait / med[key]:.1%} of the run)")
    ratios = {}
    if "warm" in med and "bare" in med:
        ratios["warm / bare"] = med["warm"] / med["bare"]
    if "cold" in med and "warm" in med:
        ratios["cold / warm"] = med["cold"] / med["warm"]
    if "bare" in med and "memory" in med:
        ratios["bare / memory"] = med["bare"] / med["memory"]  # what reading batches costs a forward pass
    warm_stages = report["phases"].get("warm", {}).get("stages", {})
    if "thresholds" in warm_stages and "bare" in med:  # stage 1 is the one pass every run makes
        ratios["warm stage 1 / bare"] = warm_stages["thresholds"] / med["bare"]
    targets = TARGETS["cuda" if cuda else "cpu"]
    for name, value in ratios.items():
        target = targets.get(name)
        verdict = "no target on this device" if target is None else (
            "met" if value <= target else f"missed by {value / target - 1:.0%}")
        note = {"bare / memory": " (no target: what reading the batches adds to a forward pass)",
                "warm stage 1 / bare": " (no target: one pass with the thresholds' and top images' work)"}.get(name, "")
        print(f"{name}: {value:.2f}x (target <= {target}x: {verdict})" if target else f"{name}: {value:.2f}x{note}")
    report["ratios"] = ratios
    if cuda and "warm" in med:
        budget = GPU_WARM_SECONDS_PER_63305 * args.n / 63305
        print(f"warm: {med['warm']:.1f} s for {args.n} images (target <= {budget:.1f} s: "
              f"{'met' if med['warm'] <= budget else 'missed'})")
    if "cold" in med and "warm" in med:
        print(f"second run vs first: {med['cold'] / med['warm']:.2f}x faster" if med["warm"] < med["cold"]
              else "second run vs first: not faster")
    if args.sync_check:
        res = run_phase(args, "sync", cache_dir)
        print(f"host syncs: {res['syncs']} over {res['batches']} batches of the first {args.sync_check} rows "
              f"({res['syncs_per_batch']:.1f} per batch); by line: "
              + ", ".join(f"{k} x{v}" for k, v in res["sync_lines"].items()))
        report["syncs"] = res
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
