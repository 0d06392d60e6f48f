"""`dissect synth --out DIR`: generate the CGL paper's synthetic shapes dataset (Broden format)."""
from __future__ import annotations

import argparse
from pathlib import Path

# Only the defaults at import time: the generator (numpy, PIL, tqdm) loads in run(), so `dissect --help`
# stays fast.
DEFAULT_PER_CLASS, DEFAULT_SIZE, DEFAULT_SEED, DEFAULT_VAL_FRACTION = 640, 64, 0, 0.2  # broden.synthetic's


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `synth` subcommand."""
    p = subparsers.add_parser(
        "synth", help="generate the synthetic shapes dataset (CGL paper, section 4.1)",
        description="Write 45 * PER_CLASS images of two coloured shapes, with color/shape/color_shape "
                    "label maps (Broden format), classes.csv (45-class and binary labels, train/val "
                    "split) and synthetic.json (the parameters). Deterministic for a seed.")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory (new or empty)")
    p.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS, metavar="N",
                   help="images per class, 45 classes (default 640, the paper's 28,800 images)")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help="image side in px, a multiple of 4 (default 64)")
    p.add_argument("--shape-size", type=int, default=None, metavar="PX",
                   help="shape side in px (default round(13 * size / 64): 13 at 64)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed (default 0)")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, metavar="F",
                   help="fraction of images in the val split, stratified by class (default 0.2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Generate (or reuse) the dataset and print a summary."""
    from broden.synthetic import CLASS_NAMES, generate_shapes_dataset, summarize

    root = generate_shapes_dataset(args.out, per_class=args.per_class, size=args.size, seed=args.seed,
                                   val_fraction=args.val_fraction, progress=not args.quiet,
                                   shape_size=args.shape_size, option="--out")
    s = summarize(root)
    params = ", ".join(f"{k}={v}" for k, v in s["parameters"].items())
    print(f"synthetic shapes dataset in {root} ({params})")
    print(f"images: {s['images']['train']} train, {s['images']['val']} val")
    print(f"classes: {s['classes45']} of {len(CLASS_NAMES)} (class45); "
          f"binary (square present): {s['binary']['1']} yes, {s['binary']['0']} no")
    print("label pixels (at the label-map resolution):")
    for name, count in s["label_pixels"].items():
        print(f"  {name:<15} {count:>12,}")
    for what, path in s["files"].items():
        print(f"{what}: {path}")
    return 0
