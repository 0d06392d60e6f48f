"""Time of one training step with every CGL term vs plain weight decay, side by side.

Same model, batch, device and code path (cgl_train.engine.train_step, the
function training runs); the two modes' steps alternate so that machine noise
hits both alike. Reports the median over --steps timed steps after --warmup,
in wall time and in this process's CPU time (steadier on a shared machine:
time spent descheduled does not count), with the load average before and after.
On the CPU the process is set up as `cgl_train.engine.train` sets it up
(cgl_train.cpu.configure_cpu: thread count and allocator), unless --threads
overrides the thread count or --default-allocator keeps glibc's defaults.

    python benchmarks/cgl_overhead.py                       # tiny_cnn, CPU, batch 32, 64 px
    python benchmarks/cgl_overhead.py --arch alexnet --batch 128 --device cuda   # the GPU target (< 1.3x)
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cgl_train.config import TrainConfig  # noqa: E402
from cgl_train.cpu import choose_threads, keep_freed_memory  # noqa: E402
from cgl_train.engine import Trainer, build_trainer, train_step  # noqa: E402
from dissect.devices import resolve_device  # noqa: E402
from cgl_train.groups import GroupActivations  # noqa: E402
from cgl_train.models import DEFAULT_INPUT_SIZE  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="tiny_cnn", help="a cgl_train.models name (default tiny_cnn)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--size", type=int, default=None, help="input size (default: 64 for tiny_cnn, else 224)")
    p.add_argument("--num-classes", type=int, default=None, help="default: 2 for tiny_cnn, else 1000")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--groups", type=int, default=5, help="G per grouped layer (default 5)")
    p.add_argument("--lambda-bn", type=float, default=1e-3)
    p.add_argument("--lambda-g", type=float, default=1e-3)
    p.add_argument("--lambda-s", type=float, default=1e-2)
    p.add_argument("--amp", action="store_true",
                   help="mixed precision as cgl-train --amp (float16 on CUDA, bfloat16 on a CPU that has it)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: what training picks, cgl_train.cpu.choose_threads)")
    p.add_argument("--default-allocator", action="store_true",
                   help="keep glibc's malloc settings (default: tuned as training tunes them)")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_step(trainer: Trainer, x: torch.Tensor, y: torch.Tensor,
                acts: GroupActivations | None) -> tuple[float, float]:
    """(wall, process CPU) seconds of one train_step."""
    _sync(trainer.device)
    wall, cpu = time.perf_counter(), time.process_time()
    train_step(trainer, x, y, acts)
    _sync(trainer.device)
    return time.perf_counter() - wall, time.process_time() - cpu


def _setup_cpu(args: argparse.Namespace, device: torch.device) -> str:
    """Threads and allocator as training sets them (or as the flags say); a description."""
    if device.type != "cpu":
        return ""
    torch.set_num_threads(args.threads if args.threads is not None else choose_threads())
    tuned = False if args.default_allocator else keep_freed_memory()
    return f", allocator {'tuned (cgl_train.cpu)' if tuned else 'default'}"


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    """Run both modes, print the medians and their ratio."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    setup = _setup_cpu(args, device)
    size = args.size or DEFAULT_INPUT_SIZE[args.arch]
    classes = args.num_classes or (2 if args.arch == "tiny_cnn" else 1000)
    common = dict(arch=args.arch, groups=args.groups, amp=args.amp, seed=args.seed, monitor=False,
                  batch_size=args.batch, device=str(device))
    modes = {
        "weight decay": TrainConfig(**common),
        "R_bn + L_g + L_s": TrainConfig(**common, lambda_bn=args.lambda_bn, lambda_g=args.lambda_g,
                                        lambda_s=args.lambda_s),
        # the demo's setting (cgl_train/configs/table1.json): L_g and L_s on the last grouped layer only
        "... L_g, L_s last": TrainConfig(**common, lambda_bn=args.lambda_bn, lambda_g=args.lambda_g,
                                         lambda_s=args.lambda_s, group_layers="last", spatial_layers="last"),
    }
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, size, size, generator=g).to(device)  # (N, 3, H, W)
    y = torch.randint(0, classes, (args.batch,), generator=g).to(device)  # (N,)
    trainers = {name: build_trainer(cfg, classes, size, device) for name, cfg in modes.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in modes}
    load_before = _load()
    with contextlib.ExitStack() as stack:
        acts = {name: (stack.enter_context(GroupActivations(t.net, t.layer_groups, copy=False))
                       if t.objective.needs_activations() else None) for name, t in trainers.items()}
        for i in range(args.warmup + args.steps):
            for name, t in trainers.items():  # alternate, so drifts in machine load hit both
                dt = _timed_step(t, x, y, acts[name])
                if i >= args.warmup:
                    times[name].append(dt)
    wall = {name: statistics.median(w for w, _ in v) for name, v in times.items()}
    cpu = {name: statistics.median(c for _, c in v) for name, v in times.items()}
    base = "weight decay"
    layers = trainers["R_bn + L_g + L_s"].layer_groups
    print(f"arch {args.arch}, batch {args.batch}, {size} px, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"amp {trainers[base].use_amp}, torch {torch.__version__}, threads {torch.get_num_threads()}{setup}")
    print(f"grouped layers: {len(layers)} ({', '.join(lg.name for lg in layers)}), G = {args.groups}; "
          f"'... L_g, L_s last': R_bn on all, L_g and L_s on {layers[-1].name} only; "
          f"median of {args.steps} steps after {args.warmup} warm-up; load average {load_before} -> {_load()}")
    print(f"{'mode':<20}{'wall ms/step':>14}{'min':>9}{'max':>9}{'ratio':>8}{'cpu ms/step':>14}{'ratio':>8}")
    for name, v in times.items():
        walls = [w for w, _ in v]
        print(f"{name:<20}{wall[name] * 1e3:>14.1f}{min(walls) * 1e3:>9.1f}{max(walls) * 1e3:>9.1f}"
              f"{wall[name] / wall[base]:>8.2f}{cpu[name] * 1e3:>14.1f}{cpu[name] / cpu[base]:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
