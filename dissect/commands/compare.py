"""`dissect compare DIR_A DIR_B ...`: unique detectors, RUD and accuracy of runs side by side."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `compare` subcommand."""
    from reports.compare import FORMATS
    from reports.results import UNIQUE_DEFINITIONS

    p = subparsers.add_parser(
        "compare", help="compare dissection runs (CGL Tables 1-3) with differences to the first",
        description="Tables of unique detectors per layer and category, their sums, RUD and recorded "
                    "accuracy for two or more results directories; differences are against the first.")
    p.add_argument("dirs", metavar="DIR", nargs="+", type=Path, help="results directories (two or more)")
    p.add_argument("--format", choices=FORMATS, default="md", help="md (GitHub table, default), csv or html")
    p.add_argument("--out", metavar="FILE", type=Path, default=None,
                   help="write here instead of printing (required for html)")
    p.add_argument("--names", metavar="A,B", default=None, help="comma-separated run names (default: directory names)")
    p.add_argument("--definition", choices=list(UNIQUE_DEFINITIONS), default="paper",
                   help="unique-detector definition (default paper: the CGL paper's counting)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the comparison and print or write it."""
    from reports.compare import compare_runs, write_comparison

    names = [n.strip() for n in args.names.split(",")] if args.names is not None else None
    cmp = compare_runs(args.dirs, names=names, definition=args.definition)
    text = write_comparison(cmp, args.format, args.out)
    if args.out is None:
        print(text, end="" if text.endswith("\n") else "\n")
    else:
        print(f"compare: {args.out}")
    return 0
