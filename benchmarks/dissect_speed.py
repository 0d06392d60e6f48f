"""Cold dissection vs warm dissection vs a bare forward pass, AlexNet conv1-conv5, side by side in one run.

    python benchmarks/dissect_speed.py [--n 384] [--repeat 3] [--device auto] [--batch-size 64] [--dir DIR]
                                       [--threads N] [--loader-threads N] [--keep-activations auto]

Generates (or reuses, in --dir) a Broden-format set of --n rows, each with its
own real files written by broden.writer: a 224 px JPEG image and three 112 px
label PNGs (color, object, part) plus an image-level scene label. Then, per
repeat, each in a fresh process (so peak RSS is per phase):

- cold: `dissect.run` with an empty cache dir: the first pass decodes the JPEG
  and PNG files (the OS page cache already holds them: this measures decoding,
  not the disk) and writes the decoded cache as it goes;
- warm: the same run again: the decoded cache is there;
- bare: a forward pass of the whole AlexNet over batches read from that cache
  (after one untimed warm-up pass), the engine's floor.

Prints the median over repeats, images/s, peak RSS and the load average
around each phase, then the ratios against the targets (warm <= 1.2x bare,
cold <= 1.5x warm on CPU). The model is torchvision AlexNet with random
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
TARGETS = {"warm / bare": 1.2, "cold / warm": 1.5}


def blobs(rng: np.random.Generator, size: int, ids: np.ndarray, cells: int) -> np.ndarray:
    """A (size, size) label map of rectangular cells, each an id from `ids` (0 = unlabeled allowed)."""
    grid = rng.choice(ids, size=(cells, cells))
    return np.kron(grid, np.ones((size // cells + 1, size // cells + 1), dtype=grid.dtype))[:size, :size]


def make_dataset(root: Path, n: int, seed: int = 0) -> Path:
    """A Broden dir of n rows, each with its own JPEG and PNG files; reused when already made."""
    from broden.writer import BrodenWriter

    done = root / "bench.json"
    spec = {"n": n, "seed": seed, "files": "per-row"}
    if done.is_file() and json.loads(done.read_text()) == spec:
        return root
    if root.exists():
        shutil.rmtree(root)
    rng = np.random.default_rng(seed)
    w = BrodenWriter(root, CATS)
    for i in range(1, 71):
        w.add_label(i, f"label{i}")
    ramp = np.linspace(0, 255, 224, dtype=np.float32)
    for k in range(n):
        base = rng.integers(0, 256, size=3).astype(np.float32)
        # smooth content plus noise: JPEG sizes and decode costs like photographs', not like pure noise
        img = (base + ramp[None, :, None] * 0.5 + rng.normal(0, 12, (224, 224, 3))).clip(0, 255).astype(np.uint8)
        color = blobs(rng, 112, np.arange(1, 11), 8)
        obj = blobs(rng, 112, np.concatenate([[0], np.arange(11, 41)]), 4)
        part = blobs(rng, 112, np.concatenate([[0] * 4, np.arange(41, 61)]), 16)
        w.add_image(f"b{k:05d}", img, layers={"color": [color], "object": [obj], "part": [part]},
                    image_labels={"scene": [61 + k % 10]}, image_format="jpg")
    w.close()
    done.write_text(json.dumps(spec))
    return root


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
    """One measured phase in this process: 'bare', 'cold' or 'warm'."""
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


def run_phase(args: argparse.Namespace, name: str, cache_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--phase", name, "--root", str(args.root), "--cache-dir", str(cache_dir),
           "--out", str(args.dir / f"out-{name}"), "--device", args.device, "--batch-size", str(args.batch_size),
           "--threads", str(args.threads), "--loader-threads", str(args.loader_threads),
           "--keep-activations", args.keep_activations]
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
    p.add_argument("--phase", choices=("bare", "cold", "warm"), help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase:
        print(json.dumps(phase(args)))
        return 0

    args.dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    args.root = make_dataset(args.dir / "broden", args.n)
    print(f"dataset: {args.n} rows of real JPEG + PNG files at {args.root} "
          f"({time.perf_counter() - t:.1f} s to make or reuse)")
    results: dict[str, list[dict]] = {"cold": [], "warm": [], "bare": []}
    for r in range(args.repeat):
        cache_dir = args.dir / "cache"
        shutil.rmtree(cache_dir, ignore_errors=True)  # cold: no decoded cache at all
        for name in ("cold", "warm", "bare"):
            res = run_phase(args, name, cache_dir)
            results[name].append(res)
            print(f"  repeat {r + 1}: {name:5s} {res['seconds']:7.2f} s  (load {res['load']:.2f})", flush=True)
    med = {k: statistics.median(x["seconds"] for x in v) for k, v in results.items()}
    first = results["warm"][0]
    print(f"device: {first['device']}; torch threads {first['threads']}, loader threads {first['loader_threads']}; "
          f"batch size {args.batch_size}; {args.repeat} repeat(s), medians")
    print(f"{'':34s}{'seconds':>9s}{'images/s':>10s}{'peak RSS':>10s}{'load':>7s}")
    rows = (("cold (JPEG/PNG, writes the cache)", "cold"), ("warm (decoded cache)", "warm"),
            ("bare forward (decoded cache)", "bare"))
    for label, key in rows:
        rss = max(x["rss_gib"] for x in results[key])
        load = statistics.median(x["load"] for x in results[key])
        print(f"{label:34s}{med[key]:9.2f}{args.n / med[key]:10.1f}{rss:9.2f}G{load:7.2f}")
    stages = {k: statistics.median(x["timings"][k] for x in results["warm"]) for k in first["timings"]}
    print("warm stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()))
    ratios = {"warm / bare": med["warm"] / med["bare"], "cold / warm": med["cold"] / med["warm"]}
    for name, value in ratios.items():
        target = TARGETS[name]
        verdict = "met" if value <= target else f"missed by {value / target - 1:.0%}"
        print(f"{name}: {value:.2f}x (target <= {target}x: {verdict})")
    print(f"second run vs first: {med['cold'] / med['warm']:.2f}x faster" if med["warm"] < med["cold"]
          else "second run vs first: not faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
