"""Stage-2 mask computation per batch: `mask_pixels` in mode "torch" vs mode "pil", side by side.

Two AlexNet-like layers, one batch of 64 images each, per-unit top-0.5%
thresholds of a 4-batch stream (as stage 1 computes them):

- conv5: 256 units, 13x13 -> 112x112
- conv1-sized: 64 units, 55x55 -> 113x113

Rows: the sparse exact engine in each mode, and for scale the dense PIL
path the pil mode avoids (`pil_bilinear` of every map, then `>`). Also the
on-pixels per mode and how many differ between the two arithmetics.

    .venv/bin/python benchmarks/upsample_modes.py [--device cpu|cuda] [--repeat 3] [--threads 0]

Figures (best of 3; the dense path once), seconds per batch, from this
project's shared development VM: 2 cores of an AMD EPYC, load average ~4
from other work at the time, torch 2.14 CPU build on 1 thread, Pillow 13.0.0:

    layer                    torch     pil   pil dense   on-pixels differing
    conv5 13->112, 256 u     0.074   0.102       5.55    0 of 771,154
    55->113, 64 u            0.049   0.089       1.04    1 of 176,866

The pil engine costs 1.4-1.8x the torch one and 1/10-1/50 of the dense
path; figures vary by 2x with the load, so re-run them side by side. (A rerun
on the same VM, 3 repeats: torch 0.126 / pil 0.147 s and torch 0.083 / pil
0.134 s.) That is why `dissect run --upsample` defaults to torch; pil is the
reference's arithmetic, for reproducing NetDissect-Lite's counts exactly.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from dissect.pil_resample import pil_bilinear
from dissect.stats import TopQuantile
from dissect.upsample import mask_pixels, upsample


def _time(fn: Callable[[], object], repeat: int, device: torch.device, warm_up: bool = True) -> float:
    """Best wall time of `repeat` calls, after one warm-up call unless told otherwise."""
    if warm_up:
        fn()
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _smooth_acts(b: int, u: int, h: int, gen: torch.Generator) -> torch.Tensor:
    # spatially smooth, sparse maps like a ReLU conv layer's, so masks have realistic density
    coarse = torch.randn(b, u, (h + 2) // 3, (h + 2) // 3, generator=gen)
    return torch.relu(upsample(coarse, (h, h)) - 0.5)


def _keys(acts: torch.Tensor, thresholds: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Sorted flat keys (b*U + u) * size^2 + pix of the on-pixels."""
    keys = [rows * size * size + pix for rows, pix in mask_pixels(acts, thresholds, (size, size), mode=mode)]
    return torch.cat(keys).sort().values if keys else torch.zeros(0, dtype=torch.int64)


def _dense_pil(acts: torch.Tensor, thresholds: torch.Tensor, size: int) -> int:
    """The dense pil expression in chunks of 256 maps: on-pixel count."""
    b, u, h, w = acts.shape
    flat, thr = acts.reshape(b * u, h, w), thresholds.double().repeat(b)
    total = 0
    for s in range(0, b * u, 256):
        up = pil_bilinear(flat[s:s + 256], (size, size))
        total += int((up.double() > thr[s:s + 256].view(-1, 1, 1)).sum())
    return total


def _layer(name: str, b: int, u: int, h: int, size: int, repeat: int, dev: torch.device,
           gen: torch.Generator) -> None:
    stream = [_smooth_acts(b, u, h, gen).to(dev) for _ in range(4)]
    tq = TopQuantile(u, len(stream) * b * h * h, device=dev)
    for x in stream:
        tq.add(x)
    thresholds, acts = tq.result(), stream[-1]
    times = {mode: _time(lambda m=mode: sum(r.numel() for r, _ in mask_pixels(
        acts, thresholds, (size, size), mode=m)), repeat, dev) for mode in ("torch", "pil")}
    dense = _time(lambda: _dense_pil(acts, thresholds, size), 1, dev, warm_up=False)  # slow: once
    k_torch, k_pil = _keys(acts, thresholds, size, "torch"), _keys(acts, thresholds, size, "pil")
    differ = int(torch.cat([k_torch, k_pil]).unique(return_counts=True)[1].eq(1).sum())
    print(f"{name:<24} {times['torch']:>8.3f} {times['pil']:>8.3f} {dense:>10.2f}   "
          f"{k_torch.numel():>9,} {k_pil.numel():>9,} {differ:>7,}")


def main() -> None:
    """Run both layers and print one row each."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    print(f"device {dev}, {torch.get_num_threads()} thread(s); seconds per batch of 64 images")
    print(f"{'layer':<24} {'torch':>8} {'pil':>8} {'pil dense':>10}   {'on torch':>9} {'on pil':>9} {'differ':>7}")
    _layer("conv5 13->112, 256 u", 64, 256, 13, 112, args.repeat, dev, gen)
    _layer("55->113, 64 u", 64, 64, 55, 113, args.repeat, dev, gen)


if __name__ == "__main__":
    main()
