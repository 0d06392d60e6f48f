"""Micro-benchmark of dissect.stats hot paths on one AlexNet-conv5-sized batch.

Prints, side by side, the time per batch and throughput of each step of a
dissection (thresholds, masks, tallies, top images) next to a bare AlexNet
forward pass of the same batch, so we see where the time goes.

    .venv/bin/python benchmarks/stats_micro.py [--device cpu|cuda] [--batch 64] [--repeat 3]
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from dissect.stats import IoUTally, TopImages, TopQuantile
from dissect.upsample import mask_pixels, threshold_masks, upsample


def _time(fn: Callable[[], object], repeat: int, device: torch.device) -> tuple[float, float]:
    """Best wall time and best process CPU time of `repeat` calls (CPU time resists a busy machine)."""
    fn()  # warm-up
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return best, best_cpu


def _smooth_acts(b: int, u: int, h: int, gen: torch.Generator) -> torch.Tensor:
    # spatially smooth, sparse maps like a ReLU conv layer's, so masks have realistic density
    coarse = torch.randn(b, u, (h + 2) // 3, (h + 2) // 3, generator=gen)
    return torch.relu(upsample(coarse, (h, h)) - 0.5)


def _labels(b: int, k: int, size: int, num_ids: int, gen: torch.Generator) -> torch.Tensor:
    # blocky regions, as segmentation maps are, drawn from ~num_ids global ids > 255
    ids = torch.randint(1, 1198, (num_ids,), generator=gen)
    coarse = ids[torch.randint(0, num_ids, (b, k, size // 8, size // 8), generator=gen)]
    coarse[:, 1:][torch.rand(coarse[:, 1:].shape, generator=gen) < 0.5] = 0  # sparser part layers
    return coarse.repeat_interleave(8, 2).repeat_interleave(8, 3).int()


def main() -> None:
    """Run the benchmark and print one row per step."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--units", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    b, u, h, size, k_layers = args.batch, args.units, 13, 112, 3
    total = 63305 * h * h  # Broden-sized stream, so k (and the buffer) is realistic
    stream = [_smooth_acts(b, u, h, gen).to(dev) for _ in range(12)]  # (B, U, 13, 13) each
    acts = stream[-1]
    labels = _labels(b, k_layers, size, 40, gen).to(dev)  # (B, 3, 112, 112)
    image_labels = torch.randint(0, 1198, (b, 2), generator=gen).to(dev)
    cat = torch.randint(0, 6, (1198,), generator=gen).to(dev)
    # exact per-unit top-0.5% thresholds of the whole stream
    exact = TopQuantile(u, len(stream) * b * h * h, device=dev)
    for x in stream:
        exact.add(x)
    thresholds = exact.result()
    masks = threshold_masks(acts, thresholds, (size, size))
    density = float(masks.float().mean())
    reach = float((acts.amax(dim=(2, 3)) > thresholds).float().mean())

    tq = TopQuantile(u, total, device=dev)
    for x in stream[:-1]:  # past the first fill of the buffer (a long stream's steady state is cheaper)
        tq.add(x)
    tq.count = 0  # keep adding without tripping total_per_unit
    tally = IoUTally(u, cat, 6, device=dev)
    tally_orig = IoUTally(u, cat, 6, union="original", device=dev)
    prepared = tally.prepare_labels(labels, image_labels)  # once per batch, shared by every layer
    tops = TopImages(u, 10, device=dev)
    idx = torch.arange(b, device=dev)

    def quantile_add():
        tq.count = 0
        tq.add(acts)

    rows = [("TopQuantile.add", quantile_add, acts.numel()),
            ("upsample + compare (dense)", lambda: upsample(acts, (size, size)) > thresholds.view(1, u, 1, 1),
             masks.numel()),
            ("threshold_masks (pruned)", lambda: threshold_masks(acts, thresholds, (size, size)),
             masks.numel()),
            ("mask_pixels (sparse, exact)",
             lambda: [r for r in mask_pixels(acts, thresholds, (size, size))], masks.numel()),
            ("IoUTally.add lite", lambda: tally.add(masks, labels, image_labels), masks.numel()),
            ("IoUTally.add_activations lite",
             lambda: tally.add_activations(acts, thresholds, labels, image_labels), masks.numel()),
            ("IoUTally.add_activations prepared",
             lambda: tally.add_activations(acts, thresholds, prepared), masks.numel()),
            ("IoUTally.add original", lambda: tally_orig.add(masks, labels, image_labels), masks.numel()),
            ("TopImages.add", lambda: tops.add(idx, acts), acts.numel())]
    try:
        import torchvision
        net = torchvision.models.alexnet(weights=None).features.eval().to(dev)
        images = torch.randn(b, 3, 224, 224, generator=gen).to(dev)

        def forward():
            with torch.no_grad():
                net(images)
        rows.insert(0, ("AlexNet features forward", forward, images.numel()))
    except ImportError:
        pass

    print(f"device={dev} threads={torch.get_num_threads()} B={b} U={u} maps {h}x{h} -> "
          f"{size}x{size}, {k_layers} label layers, mask density {density:.4f}, "
          f"maps reaching T {reach:.3f}, k={tq.k}")
    print(f"{'step':32s} {'ms/batch':>10s} {'cpu ms':>10s} {'Mvalues/s':>10s} {'images/s':>10s}")
    for name, fn, values in rows:
        sec, cpu = _time(fn, args.repeat, dev)
        print(f"{name:32s} {sec * 1e3:10.1f} {cpu * 1e3:10.1f} {values / sec / 1e6:10.1f} "
              f"{b / sec:10.1f}")


if __name__ == "__main__":
    main()
