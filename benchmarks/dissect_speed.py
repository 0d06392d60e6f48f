"""Images/s of a bare forward pass vs a full dissection of AlexNet conv1-conv5, side by side.

    python benchmarks/dissect_speed.py --n 2000 [--device auto] [--batch-size 64] [--dir DIR]

Generates (or reuses, in --dir) a Broden-like set of --n images of 224 px with
112 px label maps (color, object and part planes, an image-level scene label):
--unique distinct images are written with broden.writer, index.csv repeats
them to n rows, and the decoded cache is written straight from those images
(docs/contracts.md format), so data loading is a warm-cache read in both runs.
The model is torchvision AlexNet with random weights (weights=None).
"""
from __future__ import annotations

import argparse
import csv
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

LAYERS = ["features.0", "features.3", "features.6", "features.8", "features.10"]
CATS = ["color", "object", "part", "scene"]


def blobs(rng: np.random.Generator, size: int, ids: np.ndarray, cells: int) -> np.ndarray:
    """A (size, size) label map of rectangular cells, each an id from `ids` (0 = unlabeled allowed)."""
    grid = rng.choice(ids, size=(cells, cells))
    return np.kron(grid, np.ones((size // cells + 1, size // cells + 1), dtype=grid.dtype))[:size, :size]


def make_dataset(root: Path, n: int, unique: int, seed: int = 0) -> Path:
    """A Broden dir of n rows over `unique` distinct images, plus its decoded cache; reused when present."""
    from broden.cache import CACHE_FORMAT, CACHE_VERSION, default_cache_dir, open_cache, source_fingerprint
    from broden.format import load_meta
    from broden.writer import BrodenWriter

    done = root / "bench.json"
    if done.is_file() and json.loads(done.read_text()) == {"n": n, "unique": unique, "seed": seed}:
        if open_cache(root) is not None:
            return root
    rng = np.random.default_rng(seed)
    w = BrodenWriter(root, CATS)
    for i in range(1, 71):
        w.add_label(i, f"label{i}")
    for k in range(unique):
        img = rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
        color = blobs(rng, 112, np.arange(1, 11), 8)
        obj = blobs(rng, 112, np.concatenate([[0], np.arange(11, 41)]), 4)
        part = blobs(rng, 112, np.concatenate([[0] * 4, np.arange(41, 61)]), 16)
        w.add_image(f"b{k}", img, layers={"color": [color], "object": [obj], "part": [part]},
                    image_labels={"scene": [61 + k % 10]}, image_format="jpg")
    w.close()
    rows = list(csv.DictReader(open(root / "index.csv")))
    with open(root / "index.csv", "w", newline="") as f:  # n rows cycling over the unique images
        out = csv.DictWriter(f, fieldnames=list(rows[0]))
        out.writeheader()
        out.writerows(rows[i % unique] for i in range(n))
    meta = load_meta(root)
    from broden.dataset import BrodenDataset

    src = BrodenDataset(root, cache="off")
    first = [src[i] for i in range(unique)]
    fingerprint = source_fingerprint(root, meta)
    target = default_cache_dir() / "decoded" / fingerprint
    target.mkdir(parents=True, exist_ok=True)
    images = np.lib.format.open_memmap(target / "images.npy", mode="w+", dtype=np.uint8, shape=(n, 3, 224, 224))
    planes = np.lib.format.open_memmap(target / "planes.npy", mode="w+", dtype=np.int16, shape=(3 * n, 112, 112))
    for i in range(n):
        images[i] = first[i % unique]["image"].numpy()
        planes[3 * i:3 * i + 3] = first[i % unique]["labels"].numpy()
    images.flush()
    planes.flush()
    del images, planes
    np.save(target / "plane_offsets.npy", np.arange(0, 3 * n + 1, 3, dtype=np.int64))
    np.save(target / "plane_category.npy", np.tile(np.array([0, 1, 2], np.int16), n))
    np.save(target / "image_labels.npy", np.array([61 + (i % unique) % 10 for i in range(n)], np.int32))
    np.save(target / "image_label_offsets.npy", np.arange(n + 1, dtype=np.int64))
    np.save(target / "image_label_category.npy", np.full(n, 3, np.int16))
    info = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "fingerprint": fingerprint,
            "source": str(root.resolve()), "categories": meta.categories, "num_images": n,
            "image_shape": [3, 224, 224], "label_shape": [112, 112], "num_planes": 3 * n,
            "num_image_labels": n, "plane_dtype": "int16"}
    (target / "meta.json").write_text(json.dumps(info, indent=1) + "\n")
    done.write_text(json.dumps({"n": n, "unique": unique, "seed": seed}))
    return root


def peak_memory(device: torch.device) -> str:
    """Peak memory so far: GPU allocator peak on CUDA, process max RSS on CPU."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB RSS"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(model: torch.nn.Module, dataset, device: torch.device, batch_size: int) -> float:
    """Seconds for one forward pass over every image (same loading and normalisation as the engine)."""
    from dissect.models import NORMALIZATIONS

    mean = torch.tensor(NORMALIZATIONS["imagenet"]["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(NORMALIZATIONS["imagenet"]["std"], device=device).view(1, 3, 1, 1)
    sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(dataset), batch_size):
            batch = dataset.get_batch(np.arange(s, min(s + batch_size, len(dataset))))
            x = (batch["image"].to(device).float().div_(255) - mean) / std
            model(x)
    sync(device)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="images (default 2000)")
    p.add_argument("--unique", type=int, default=32, help="distinct images written to disk (default 32)")
    p.add_argument("--dir", type=Path, default=Path("/tmp/dissect_speed"), help="dataset dir (reused)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--keep-activations", choices=("auto", "yes", "no"), default="auto")
    p.add_argument("--activation-budget-mb", type=int, default=2048)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)

    import torchvision

    from broden.dataset import BrodenDataset
    from dissect.config import DissectConfig
    from dissect.models import model_from_module
    from dissect.devices import resolve_device
    from dissect.pipeline import run_dissection
    from broden._progress import set_quiet

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    t = time.perf_counter()
    root = make_dataset(args.dir, args.n, min(args.unique, args.n))
    print(f"dataset: {args.n} images at {root} ({time.perf_counter() - t:.1f} s to make or reuse)")
    dataset = BrodenDataset(root, images="annotated")  # run_dissection's default rule
    if dataset.cache is None:
        print("error: no decoded cache found for the dataset", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    model = torchvision.models.alexnet(weights=None).eval().to(device)
    set_quiet(True)

    bare_forward(model, dataset, device, args.batch_size)  # warm-up: page cache, kernels, allocator
    t_fwd = bare_forward(model, dataset, device, args.batch_size)
    mem_fwd = peak_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    config = DissectConfig(layers=LAYERS, batch_size=args.batch_size, device=str(device), normalize="imagenet",
                           keep_activations=args.keep_activations,
                           activation_budget_mb=args.activation_budget_mb)
    sync(device)
    t = time.perf_counter()
    res = run_dissection(model_from_module(model, normalization="imagenet"), dataset, config)
    sync(device)
    t_dis = time.perf_counter() - t
    mem_dis = peak_memory(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; batch size {args.batch_size}; torch {torch.__version__}")
    print(f"{'':28s}{'seconds':>10s}{'images/s':>12s}  peak memory")
    print(f"{'(a) bare forward':28s}{t_fwd:10.2f}{args.n / t_fwd:12.1f}  {mem_fwd}")
    print(f"{'(b) dissection conv1-conv5':28s}{t_dis:10.2f}{args.n / t_dis:12.1f}  {mem_dis}")
    print(f"ratio (b)/(a): {t_dis / t_fwd:.2f}x   stages: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in res.timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
