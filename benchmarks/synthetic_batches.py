"""Serving the synthetic shapes set: per-item PIL through a DataLoader vs batches from memory, side by side.

"per-item PIL": what training did before the in-memory path, a DataLoader
(batch 64, the config's default; --workers processes) over a dataset that opens
each PNG with PIL; "in memory": cgl_train.engine.BatchLoader over
cgl_train.data.SyntheticShapes (decoded once, in threads, at construction; the
decode time is printed separately). Both iterate the same DistributedSampler
order; the batches are checked equal. Reports the median epoch time over
--epochs and the load average.

    python benchmarks/synthetic_batches.py --per-class 20     # 900 images of 64 px
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broden.synthetic import generate_shapes_dataset  # noqa: E402
from cgl_train.data import SyntheticShapes, normalize_uint8  # noqa: E402
from cgl_train.engine import BatchLoader  # noqa: E402


class PilItems(Dataset):
    """Each item decoded from its PNG on access (the per-item path)."""

    def __init__(self, shapes: SyntheticShapes) -> None:
        self.paths, self.labels, self.norm = shapes.paths, shapes.labels.tolist(), shapes.normalization

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[i]) as im:
            arr = np.array(im.convert("RGB"))
        return normalize_uint8(torch.from_numpy(arr).permute(2, 0, 1), self.norm), self.labels[i]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-class", type=int, default=20, help="images per class of the 45 (default 20)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the per-item path (default 2)")
    p.add_argument("--epochs", type=int, default=3)
    return p.parse_args(argv)


def _epoch_seconds(loader, sampler: DistributedSampler, epoch: int) -> tuple[float, list]:
    sampler.set_epoch(epoch)
    start = time.perf_counter()
    batches = list(loader)
    return time.perf_counter() - start, batches


def main(argv: list[str] | None = None) -> int:
    """Time both paths epoch by epoch, alternating, and print the medians."""
    args = parse_args(argv)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_shapes_dataset(Path(tmp) / "shapes", per_class=args.per_class, size=args.size, seed=0,
                                       progress=False)
        start = time.perf_counter()
        data = SyntheticShapes(root, "train")
        decode = time.perf_counter() - start
        sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=False)
        loaders = {"per-item PIL": DataLoader(PilItems(data), batch_size=args.batch, sampler=sampler,
                                              num_workers=args.workers),
                   "in memory": BatchLoader(data, sampler, args.batch)}
        times: dict[str, list[float]] = {name: [] for name in loaders}
        for epoch in range(args.epochs):
            got = {}
            for name, loader in loaders.items():
                dt, got[name] = _epoch_seconds(loader, sampler, epoch)
                times[name].append(dt)
            for (xa, ya), (xb, yb) in zip(*got.values(), strict=True):
                assert torch.equal(xa, xb) and torch.equal(ya, yb), "the two paths differ"
    print(f"{len(data)} train images of {args.size} px, batch {args.batch}, torch threads {torch.get_num_threads()}; "
          f"load average {load} -> {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"decode once into uint8 (N, 3, H, W): {decode * 1e3:.0f} ms")
    for name, v in times.items():
        workers = f" ({args.workers} workers)" if name == "per-item PIL" else ""
        print(f"{name + workers:<28} median epoch {statistics.median(v) * 1e3:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
