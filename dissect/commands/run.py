"""`dissect run MODEL --dataset D --out DIR`: dissect a model's layers against Broden concepts.

The flags come from the option declarations (dissect.config); the work is dissect.runner.run;
this module adds only the HTML report (reports.render) and the printed summary.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from broden.errors import InputError
from dissect.config import FLAG_GROUPS, DissectConfig, LoadOptions, RunSettings
from dissect.options import add_flags

# register() must stay cheap (`dissect --help` imports every command): torch, the pipeline and the
# dataset code are imported inside run().

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the `run` parser."""
    p = subparsers.add_parser(
        "run", help="dissect a model: label every unit of the chosen layers with Broden concepts",
        description="Network Dissection of MODEL (a cgl checkpoint, a state_dict with --arch, a training "
                    "script's checkpoint naming its architecture (NetDissect-Lite's and the Places365 zoo, "
                    "torchvision's and timm's train.py: no --arch needed), a TorchScript "
                    "archive with --arch, or a pickled module with --trust-pickle), or torchvision's "
                    "pretrained weights (--arch resnet18 --weights IMAGENET1K_V1, MODEL left out: read from the "
                    "torch hub cache, never downloaded; their normalisation and crop size are the defaults). "
                    "TorchScript modules "
                    "refuse forward hooks, so a TorchScript archive needs --arch NAME: its weights are "
                    "loaded into the eager NAME model, which is dissected. Writes DIR/summary.json, and per layer "
                    "tally.csv, units.json, thresholds.npy, top_activations.npy, iou.npy. Works under "
                    "`torchrun --nproc-per-node N` (images are sharded, results identical).")
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="model file; left out (or 'torchvision:NAME') with --arch NAME --weights W for "
                        "torchvision's pretrained weights, read offline from $TORCH_HOME/hub/checkpoints")
    p.add_argument("--dataset", required=True, metavar="D",
                   help="a Broden-format directory, a known name (broden1_224, broden1_227, broden1_384: "
                        "looked up in the cache dir, fetched with --download) or 'synthetic' (the CGL shapes "
                        "set, generated once into the cache dir)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="results directory (locked while the run works there: a second run on it exits 2)")
    groups = {key: p.add_argument_group(title) for key, title in FLAG_GROUPS.items()}
    for cls in (LoadOptions, DissectConfig, RunSettings):
        add_flags(p, cls, containers=groups)
    groups["execution"].add_argument("--no-report", dest="report", action="store_false",
                                     help="skip the HTML report (render it later with `dissect report DIR`)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of `dissect run`; returns the exit code."""
    try:
        return _run(args)
    except (InputError, KeyboardInterrupt):
        raise  # the CLI maps these to 2 and 130
    except Exception as e:  # anything else is exit 1, with the traceback in the log
        log.debug("dissect run failed", exc_info=True)
        print(f"dissect run: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from dissect.runner import run as run_dissection

    options = {name: getattr(args, name)
               for cls in (DissectConfig, LoadOptions, RunSettings) for name in cls.option_names()}
    outcome = run_dissection(args.model, args.dataset, args.out, **options)
    if not outcome.is_main:
        return 0
    if outcome.reused:
        print(f"dissect run: {outcome.out} already holds this dissection (same model, layers, dataset and "
              f"options); reusing it (--force recomputes)")
    else:
        for layer in outcome.summary_json["layers"]:
            unique = layer["unique_detectors"]
            print(f"{layer['name']}: {layer['num_units']} units, {layer['detectors']} detectors, unique "
                  f"{unique['paper']['total']} (paper) / {unique['top_label']['total']} (top label)")
        print(f"results in {outcome.out}")
    if args.report and not (outcome.reused and (outcome.out / "report" / "index.html").is_file()):
        from reports.render import render_report

        print(f"report: {render_report(outcome.out)}")
    return 0
