"""`dissect demo`: the paper's synthetic experiment end to end (what `make demo` runs)."""
from __future__ import annotations

import argparse
import platform
from pathlib import Path

from dissect.experiment import ExperimentOptions, run_experiment
from dissect.progress import set_quiet


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `demo` subcommand."""
    p = sub.add_parser(
        "demo", help="reproduce the CGL paper's Table 1 on the built-in synthetic shapes",
        description="Generate the synthetic shapes set, train the paper's tiny CNN three ways (weight decay; "
                    "R_bn; R_bn + L_g + L_s) in the binary setting, dissect conv1 and conv2 of each, and print "
                    "the unique-detector table beside the paper's. The default quick preset finishes in about "
                    "15 minutes on 2 CPU cores (fewer images and epochs than the paper: see the output); "
                    "--full runs the paper's sizes with at least 3 seeds. Finished steps in --out are reused.")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory (default demo-out)")
    p.add_argument("--full", action="store_true", help="the paper's sizes: 640 images per class, 30 epochs, >= 3 seeds")
    p.add_argument("--seeds", type=int, default=1, help="training seeds; mean and spread are reported (default 1)")
    p.add_argument("--labeling", choices=("binary", "classes45"), default="binary",
                   help="binary 'a square is present' (the paper's Table 1, default) or the 45-class setting")
    p.add_argument("--config", type=Path, help="experiment config JSON (default: cgl_train/configs/table1.json)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--epochs", type=int, help="override the preset's epochs (smoke runs)")
    p.add_argument("--per-class", type=int, help="override the preset's images per class (smoke runs)")
    p.add_argument("--no-report", dest="report", action="store_false", help="skip the HTML reports")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the experiment and print the table and where the outputs are."""
    set_quiet(args.quiet)
    opts = ExperimentOptions(out=args.out, full=args.full, seeds=args.seeds, labeling=args.labeling,
                             config=args.config, device=args.device, quiet=args.quiet, epochs=args.epochs,
                             per_class=args.per_class, report=args.report)
    result = run_experiment(opts)
    mode = "full (the paper's sizes)" if args.full else "quick preset (smaller data and fewer epochs than the paper)"
    print(f"\nCGL synthetic experiment, {mode}; machine: {platform.machine()}, {platform.processor() or 'cpu'}; "
          f"took {result.seconds / 60:.1f} min\n")
    print(result.table_md.read_text())
    print(f"table:      {result.table_md} (and {result.table_json.name})")
    for run_name, path in result.reports.items():
        print(f"report:     {path}  ({run_name})")
    if result.compare_html:
        print(f"comparison: {result.compare_html}")
    return 0
