"""`dissect compare DIR_A DIR_B ...`: unique detectors, RUD and accuracy of runs side by side."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `compare` subcommand."""
    from dissect.aggregate import DEFAULT_THRESHOLDS
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
    p.add_argument("--names", metavar="A,B", default=None,
                   help="comma-separated run names, one per DIR; runs sharing a name are seeds of one "
                        "configuration, shown as mean ± sd (default: directory names without -seedN)")
    p.add_argument("--definition", choices=list(UNIQUE_DEFINITIONS), default="paper",
                   help="unique-detector definition of tables 1-3 (default paper: the CGL paper's counting); "
                        "the threshold tables show both")
    p.add_argument("--iou-thresholds", metavar="T,T", default=",".join(f"{t:g}" for t in DEFAULT_THRESHOLDS),
                   help="IoU thresholds of the detector tables (default %(default)s: Lite's report and the CGL "
                        "authors' synthetic settings)")
    p.add_argument("--baseline", metavar="NAME", default=None,
                   help="the run (name) differences are against (default: the first)")
    p.add_argument("--reference", choices=("none", "cgl-table1"), default="none",
                   help="cgl-table1: show the CGL paper's Table 1 beside runs named as the demo's "
                        "(weight_decay, rbn, rbn_lg_ls or their titles)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the comparison and print or write it."""
    from reports.compare import compare_runs, write_comparison

    from broden.errors import InputError
    from dissect.options import comma_list

    names = comma_list(args.names)
    try:
        thresholds = [float(t) for t in comma_list(args.iou_thresholds) or []]
    except ValueError:
        raise InputError(f"--iou-thresholds {args.iou_thresholds!r}: expected comma-separated numbers") from None
    reference = None
    if args.reference == "cgl-table1":
        from cgl_train.experiment import paper_reference

        reference = paper_reference()
    cmp = compare_runs(args.dirs, names=names, definition=args.definition, thresholds=thresholds,
                       baseline=args.baseline, reference=reference)
    text = write_comparison(cmp, args.format, args.out)
    if args.out is None:
        print(text, end="" if text.endswith("\n") else "\n")
    else:
        print(f"compare: {args.out}")
    return 0
