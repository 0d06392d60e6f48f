"""Images/s: decoding JPEG + PNG on the fly vs slicing the decoded cache, side by side in one run.

    python benchmarks/broden_cache_speed.py --n 2000 [--dir DIR] [--batch 64]

Generates (or reuses, when --dir already holds one with --n rows) a Broden-like
set: 224 px JPEG images, 112 px label maps, a color layer, an object layer,
1-2 part layers and a scene label per image, written with broden.writer.
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broden.cache import build_cache, open_cache  # noqa: E402
from broden.dataset import BrodenDataset  # noqa: E402
from broden.writer import BrodenWriter  # noqa: E402

CATEGORIES = ["color", "object", "part", "material", "scene", "texture"]


def _blocky(rng: np.random.Generator, ids: np.ndarray, size: int, block: int = 14) -> np.ndarray:
    """A (size, size) label map of constant blocks, closer to real segmentations than pixel noise."""
    small = rng.choice(ids, size=(size // block, size // block))
    return np.kron(small, np.ones((block, block), dtype=small.dtype))


def generate(root: Path, n: int, size: int, label_size: int, seed: int) -> None:
    """Write a Broden-like dataset of n images at `root`."""
    rng = np.random.default_rng(seed)
    w = BrodenWriter(root, CATEGORIES)
    colors, objects, parts, scenes = np.arange(1, 12), np.arange(12, 300), np.arange(300, 340), np.arange(340, 360)
    for i in np.concatenate([colors, objects, parts, scenes]):
        w.add_label(int(i), f"label{i}")
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    for k in range(n):
        base = rng.integers(0, 256, size=3).astype(np.float32)
        img = (base + ramp[None, :, None] * 0.5 + rng.normal(0, 12, (size, size, 3))).clip(0, 255).astype(np.uint8)
        layers = {"color": [_blocky(rng, colors, label_size)],
                  "object": [_blocky(rng, np.concatenate([[0], objects[:40]]), label_size)],
                  "part": [_blocky(rng, np.concatenate([[0], parts]), label_size) for _ in range(1 + k % 2)]}
        w.add_image(f"im{k:06d}", img, split="train" if k % 5 else "val", layers=layers,
                    image_labels={"scene": [int(rng.choice(scenes))]}, image_format="jpg")
    w.close()


def rows_in(root: Path) -> int:
    """Number of rows of an existing index.csv (-1 when there is none)."""
    index = root / "index.csv"
    if not index.is_file():
        return -1
    with open(index, newline="") as f:
        return sum(1 for _ in csv.reader(f)) - 1


def images_per_second(ds: BrodenDataset, batch: int) -> float:
    """Read every item through get_batch in batches; return images per second."""
    start = time.perf_counter()
    for s in range(0, len(ds), batch):
        ds.get_batch(range(s, min(s + batch, len(ds))))
    return len(ds) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="number of images (default 2000)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="dataset directory to create or reuse (default: a temp dir)")
    parser.add_argument("--batch", type=int, default=64, help="batch size for get_batch (default 64)")
    parser.add_argument("--size", type=int, default=224, help="image size (default 224)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    args = parser.parse_args()

    tmp = None
    if args.dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="broden-bench-")
        args.dir = Path(tmp.name)
    root = args.dir / "broden"
    have = rows_in(root)
    if have == -1:
        t = time.perf_counter()
        generate(root, args.n, args.size, args.size // 2, args.seed)
        print(f"generated {args.n} images in {root} ({time.perf_counter() - t:.1f} s)")
    elif have != args.n:
        print(f"error: {root} holds {have} images, not --n {args.n}; pick another --dir", file=sys.stderr)
        return 2
    else:
        print(f"reusing {have} images in {root}")

    cache_dir = args.dir / "cache"
    reused = open_cache(root, cache_dir=cache_dir) is not None
    t = time.perf_counter()
    build_cache(root, cache_dir=cache_dir, progress=False)
    build_s = time.perf_counter() - t

    decoded = BrodenDataset(root, cache="off")
    cached = BrodenDataset(root, cache=cache_dir)
    assert cached.cache is not None
    decode_ips = images_per_second(decoded, args.batch)
    cache_ips = images_per_second(cached, args.batch)
    print(f"{'images':>8} {'batch':>6} {'decode img/s':>13} {'cache img/s':>12} {'ratio':>7} {'cache build s':>14}")
    print(f"{len(decoded):>8} {args.batch:>6} {decode_ips:>13.1f} {cache_ips:>12.1f} "
          f"{cache_ips / decode_ips:>6.1f}x {'reused' if reused else f'{build_s:.1f}':>14}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
