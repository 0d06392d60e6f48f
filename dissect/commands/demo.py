"""`dissect demo`: the paper's synthetic experiment end to end (what `make demo` runs).

The experiment itself (train, dissect, table) is cgl_train.experiment, a layer above dissect, and
the HTML views are reports, above that: this CLI entry point imports both lazily, for this verb only.
"""
from __future__ import annotations

import argparse
import os
import platform

from dissect.options import add_flags


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `demo` subcommand."""
    from cgl_train.experiment import ExperimentOptions

    p = sub.add_parser(
        "demo", help="reproduce the CGL paper's Table 1 on the built-in synthetic shapes",
        description="Generate the synthetic shapes set; per seed, keep the untrained network as the control "
                    "and train the paper's tiny CNN three ways (weight decay; R_bn; R_bn + L_g + L_s) in the "
                    "binary setting until its validation accuracy plateaus; dissect conv1 and conv2 of each; "
                    "print the tables (both unique-detector definitions at IoU 0.04 and 0.08, mean ± sd over "
                    "seeds, paired differences against weight decay) beside the paper's. The quick preset is "
                    "sized for 30 minutes on 2 CPU cores (fewer images than the paper: see the output); --full "
                    "runs the paper's 28,800 images with at least 3 seeds (meant for a GPU). Finished steps in "
                    "--out are reused.")
    add_flags(p, ExperimentOptions)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the experiment, render the reports and the comparison, print the table and where outputs are."""
    from cgl_train.experiment import ExperimentOptions, run_experiment

    opts = ExperimentOptions.from_args(args)
    result = run_experiment(opts)
    views = None
    if opts.report:
        from reports.experiment import render_experiment

        views = render_experiment(result)
    mode = "full (the paper's sizes)" if opts.full else "quick preset (fewer images than the paper)"
    print(f"\nCGL synthetic experiment, {mode}, seeds {', '.join(map(str, result.seeds))}; machine: "
          f"{platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} cores; took "
          f"{result.seconds / 60:.1f} min\n")
    print(result.table_md.read_text())
    print(f"table:      {result.table_md} (and {result.table_json.name})")
    if views is not None:
        for run_name, path in views.reports.items():
            print(f"report:     {path}  ({run_name})")
        print(f"comparison: {views.compare_html}")
    return 0
