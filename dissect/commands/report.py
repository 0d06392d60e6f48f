"""`dissect report DIR`: render the HTML report of a finished dissection (no recomputation)."""
from __future__ import annotations

import argparse
from pathlib import Path

from broden.errors import InputError


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in 0..1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in 0..1, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `report` subcommand."""
    p = subparsers.add_parser(
        "report", help="render the HTML report of a results directory",
        description="Write DIR/report/index.html and one page per layer from the files `dissect run` "
                    "wrote. The pages open from disk (file://) with no server or internet.")
    p.add_argument("dir", metavar="DIR", type=Path, help="results directory (the --out of `dissect run`)")
    p.add_argument("--out", metavar="DIR", type=Path, default=None, help="report directory (default: DIR/report)")
    p.add_argument("--top-k", type=_positive, metavar="N", default=None,
                   help="top images shown per unit (default: all the run stored)")
    p.add_argument("--psi-units", nargs="+", action="extend", metavar="LAYER:U,U", default=[],
                   help="draw soft receptive fields (psi, CGL Figure 5) of these units over their top "
                        "images, e.g. conv2:5,17; this loads the model from summary.json")
    p.add_argument("--psi-p1", type=float, default=1.0, metavar="P1", help="psi scale P1 (default 1)")
    p.add_argument("--psi-p2", type=float, default=0.0, metavar="P2", help="psi offset P2 (default 0)")
    p.add_argument("--device", default="cpu", help="device for the psi forward passes (default cpu)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="for --psi-units on a pickled model: allow running code from the file")
    p.add_argument("--allow-model-mismatch", action="store_true",
                   help="for --psi-units: draw psi maps even when the model file no longer matches the "
                        "fingerprint in summary.json (default: refused)")
    p.add_argument("--thumb-height", type=_positive, default=112, metavar="PX",
                   help="height of each top-image thumbnail (default 112)")
    p.add_argument("--dim", type=_fraction, default=0.2,
                   help="brightness kept outside the activation mask (default 0.2, the reference's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Render the report and print where it is."""
    from reports.psi import parse_psi_units
    from reports.render import render_report

    if not args.dir.is_dir():
        raise InputError(f"{args.dir}: no such results directory")
    index = render_report(args.dir, out_dir=args.out, top_k=args.top_k,
                          psi_units=parse_psi_units(args.psi_units), thumb_height=args.thumb_height,
                          dim=args.dim, psi_p1=args.psi_p1, psi_p2=args.psi_p2, device=args.device,
                          trust_pickle=args.trust_pickle, allow_model_mismatch=args.allow_model_mismatch)
    print(f"report: {index}")
    return 0
