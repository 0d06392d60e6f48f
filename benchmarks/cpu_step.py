"""CPU training step of the paper's tiny CNN: memory format x threads x allocator, side by side.

Times cgl_train.engine.train_step (batch 32, 64 px by default) for a plain
weight-decay step and a step with R_bn + L_g + L_s, with the model and input in
contiguous (NCHW) or channels_last memory format, with 1 and 2 intra-op threads,
under glibc's default allocator and under the tuning training applies
(cgl_train.cpu.keep_freed_memory). The allocator setting is process-wide, so
each one runs in child processes, alternated over --rounds; within a child every
configuration's steps alternate, so load drifts hit them alike. Prints medians
of wall and process CPU time per step (CPU time leaves out time spent
descheduled, steadier on a shared machine), and the load average.

    python benchmarks/cpu_step.py                 # 3 rounds x 4 timed steps per configuration
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cgl_train.config import TrainConfig  # noqa: E402
from cgl_train.cpu import keep_freed_memory  # noqa: E402
from cgl_train.engine import build_trainer, train_step  # noqa: E402
from cgl_train.groups import GroupActivations  # noqa: E402

FORMATS = ("contiguous", "channels_last")
THREADS = (1, 2)
MODES = ("plain", "cgl")
ALLOCATORS = ("default", "tuned")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="timed steps per configuration and round (default 4)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="child processes per allocator, alternated (default 3)")
    p.add_argument("--child", choices=ALLOCATORS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _config(mode: str, batch: int) -> TrainConfig:
    cgl = dict(lambda_bn=1e-3, lambda_g=1e-3, lambda_s=1e-2) if mode == "cgl" else {}
    return TrainConfig(arch="tiny_cnn", groups=5, monitor=False, batch_size=batch, device="cpu", **cgl)


def run_child(args: argparse.Namespace) -> None:
    """Time every (format, threads, mode) in this process; print one JSON line per timed step."""
    if args.child == "tuned":
        keep_freed_memory()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)  # (N, 3, H, W)
    y = torch.randint(0, 2, (args.batch,), generator=g)  # (N,)
    configs = list(itertools.product(FORMATS, THREADS, MODES))
    trainers, inputs = {}, {}
    with contextlib.ExitStack() as stack:
        acts = {}
        for fmt, threads, mode in configs:
            t = build_trainer(_config(mode, args.batch), 2, args.size, torch.device("cpu"))
            layout = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
            t.net.to(memory_format=layout)
            trainers[fmt, threads, mode] = t
            inputs[fmt] = x.contiguous(memory_format=layout)
            acts[fmt, threads, mode] = (stack.enter_context(GroupActivations(t.net, t.layer_groups, copy=False))
                                        if t.objective.needs_activations() else None)
        for i in range(args.warmup + args.steps):
            for key in configs:
                torch.set_num_threads(key[1])
                wall, cpu = time.perf_counter(), time.process_time()
                train_step(trainers[key], inputs[key[0]], y, acts[key])
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                if i >= args.warmup:
                    print(json.dumps({"allocator": args.child, "format": key[0], "threads": key[1],
                                      "mode": key[2], "wall": wall, "cpu": cpu}), flush=True)


def _children(args: argparse.Namespace) -> list[dict]:
    records = []
    for _ in range(args.rounds):
        for allocator in ALLOCATORS:
            cmd = [sys.executable, __file__, "--child", allocator, "--batch", str(args.batch), "--size",
                   str(args.size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            records += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return records


def main(argv: list[str] | None = None) -> int:
    """Run the children, print the medians per configuration and the CGL / plain ratios."""
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return 0
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    records = _children(args)
    print(f"tiny_cnn, batch {args.batch}, {args.size} px, torch {torch.__version__}; "
          f"median of {args.rounds} x {args.steps} steps per cell; load average {load} -> "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'allocator':<10}{'format':<15}{'threads':>8}{'plain wall':>12}{'cgl wall':>10}{'ratio':>7}"
          f"{'plain cpu':>11}{'cgl cpu':>9}{'ratio':>7}   (ms per step)")
    for allocator, fmt, threads in itertools.product(ALLOCATORS, FORMATS, THREADS):
        med = {}
        for mode, kind in itertools.product(MODES, ("wall", "cpu")):
            values = [r[kind] for r in records if (r["allocator"], r["format"], r["threads"], r["mode"])
                      == (allocator, fmt, threads, mode)]
            med[mode, kind] = statistics.median(values) * 1e3
        print(f"{allocator:<10}{fmt:<15}{threads:>8}{med['plain', 'wall']:>12.0f}{med['cgl', 'wall']:>10.0f}"
              f"{med['cgl', 'wall'] / med['plain', 'wall']:>7.2f}{med['plain', 'cpu']:>11.0f}"
              f"{med['cgl', 'cpu']:>9.0f}{med['cgl', 'cpu'] / med['plain', 'cpu']:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
