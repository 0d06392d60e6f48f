"""`cgl-train`: train a CNN with Concept Group Learning (or the weight-decay baseline).

Exit codes: 0 success, 2 bad input (option, config file, dataset, checkpoint), 1 anything else.
Under torchrun (`torchrun --nproc_per_node N -m cgl_train ...`) every rank runs
this; only rank 0 writes and prints.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

from broden.errors import InputError
from cgl_train.checkpoint import CheckpointError
from cgl_train.config import (GROUP_FORMS, LABELINGS, LR_SCHEDULES, RESUME_MAY_DIFFER, SPATIAL_COORDS,
                              TrainConfig, check_resumable, parse_layer_ints)
from cgl_train.distributed import env_world_size

__all__ = ["build_parser", "config_from_args", "recorded_options", "json_object", "main"]

DESCRIPTION = """\
Train a CNN with the objective L = L_task + lambda_bn R_bn + lambda_g L_g + lambda_s L_s
(Concept Group Learning, Varshneya et al.). All lambdas default to 0: the weight-decay
baseline. Every option, resolved, is saved in out/config.json and in every checkpoint.

Weight decay (--weight-decay) applies to every parameter that R_bn does not cover: with
--lambda-bn > 0 the grouped filters of the grouped conv layers get NO weight decay (R_bn
replaces it); their free filters, all biases, batch-norm parameters and the classifier
still decay as usual. With --lambda-bn 0 every parameter decays.
"""
EPILOG = """\
examples:
  cgl-train --data synthetic --arch tiny_cnn --out runs/wd
  cgl-train --data synthetic --arch tiny_cnn --out runs/cgl --lambda-bn 1e-3 --lambda-g 1e-3 --lambda-s 1e-2
  cgl-train --data /data/places365 --arch alexnet --out runs/alex --groups 5 --lambda-bn 5e-3 --amp
  torchrun --nproc_per_node 4 -m cgl_train --data /data/imagenet --arch vgg16 --out runs/vgg
  cgl-train --resume --out runs/cgl                 (continue a run with its recorded options)
  cgl-train --resume --out runs/wd --epochs 60      (extend a 'step' or 'constant' schedule run)

outputs: out/latest.pth, out/best.pth (best val top-1), out/config.json, out/log.jsonl (a first
header line {"header": true, "seed", "config", "versions", ...}, then one JSON line per epoch)

resume: --resume --out DIR starts from the options recorded in DIR (config.json, else latest.pth);
flags may change only these options (any other that differs is an error):
""" + textwrap.fill(", ".join(RESUME_MAY_DIFFER), width=96, initial_indent="  ", subsequent_indent="  ") + """
--epochs may change only with the 'step' or 'constant' schedule: 'cosine' anneals to 0 at --epochs,
so a run extended from 2 to 3 epochs would not equal a 3-epoch run; it is refused.

multi-GPU (DDP under torchrun): one process per device; --batch-size is the GLOBAL batch, split
evenly over the ranks; DDP averages the gradients; only rank 0 writes and prints. L_task and R_bn
then give the same update as one process on the same global batch (for models without BatchNorm:
no SyncBN is used, so AlexNet-B's BN layers normalise per rank). L_g and L_s do not: they use
per-rank minibatch statistics, computed on each rank's share of the batch: S (the per-channel std
over the minibatch in psi's no-BN variant), the BN statistics behind the BN variant's tau, and the
paper-form L_g's L1 norms over minibatch and space. This is what the authors' code does, and what
BatchNorm without SyncBN does. With --lambda-g or --lambda-s > 0, DDP training equals one process
in expectation, not bit for bit; set them to 0 for an exact equivalence.
"""


def json_object(text: str) -> dict[str, Any]:
    """argparse type of --arch-kwargs: a JSON object, with an error message that shows one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({e.msg}); expected a JSON object, "
                                         f"e.g. '{{\"width1\": 64}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is a JSON {type(value).__name__}; expected a JSON object, "
                                         f"e.g. '{{\"width1\": 64}}'")
    return value


def _add(parser: argparse.ArgumentParser, *flags: str, **kw: Any) -> None:
    # every default is SUPPRESS: only flags given on the command line override --config / the dataclass
    parser.add_argument(*flags, default=argparse.SUPPRESS, **kw)


def build_parser() -> argparse.ArgumentParser:
    """The `cgl-train` argument parser (flags override --config, which overrides the defaults)."""
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="cgl-train", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add(p, "--config", metavar="JSON", help="a JSON file of options (TrainConfig fields); flags override it")
    g = p.add_argument_group("data and model")
    _add(g, "--data", help=f"'synthetic' (the paper's shapes, generated once) or an ImageFolder root "
                           f"with train/ and val/ class folders (default {d.data})")
    _add(g, "--arch", help=f"tiny_cnn, alexnet, alexnet_b or vgg16 (default {d.arch})")
    _add(g, "--arch-kwargs", metavar="JSON", type=json_object,
         help='extra constructor arguments, e.g. \'{"width1": 32, "width2": 64}\' for tiny_cnn')
    _add(g, "--out", help=f"output directory (default {d.out})")
    _add(g, "--labeling", choices=LABELINGS, help=f"synthetic labels (default {d.labeling})")
    _add(g, "--synthetic-dir", help="where the synthetic set is generated or reused "
                                    "(default: $DISSECT_CACHE_DIR, else ~/.cache/concept-dissect, then synthetic/<parameters>)")
    _add(g, "--synthetic-per-class", type=int, help=f"synthetic images per class (default {d.synthetic_per_class})")
    _add(g, "--synthetic-size", type=int, help=f"synthetic image size (default {d.synthetic_size})")
    _add(g, "--synthetic-seed", type=int, help=f"synthetic generator seed (default {d.synthetic_seed})")
    _add(g, "--synthetic-val-fraction", type=float,
         help=f"synthetic validation share (default {d.synthetic_val_fraction})")
    _add(g, "--input-size", type=int, help="model input size (default: synthetic size, 224 for ImageFolder)")
    g = p.add_argument_group("optimisation")
    _add(g, "--epochs", type=int, help=f"default {d.epochs}")
    _add(g, "--batch-size", type=int, help=f"GLOBAL batch, split across DDP ranks (default {d.batch_size})")
    _add(g, "--lr", type=float, help=f"SGD learning rate (default {d.lr})")
    _add(g, "--momentum", type=float, help=f"SGD momentum (default {d.momentum})")
    _add(g, "--weight-decay", type=float,
         help=f"L2 on every parameter R_bn does not cover (see above; default {d.weight_decay})")
    _add(g, "--lr-schedule", choices=LR_SCHEDULES, help=f"per-epoch schedule (default {d.lr_schedule})")
    _add(g, "--lr-step", type=int, help=f"'step' schedule period in epochs (default {d.lr_step})")
    _add(g, "--lr-gamma", type=float, help=f"'step' schedule factor (default {d.lr_gamma})")
    _add(g, "--amp", action="store_true", help="mixed precision on CUDA (ignored on CPU)")
    g = p.add_argument_group("concept groups")
    _add(g, "--layers", help="comma-separated grouped conv layers (default: every conv of the arch)")
    _add(g, "--groups", help=f"G per grouped layer: '5', 'conv1=5,conv2=8' or '5,conv2=8' (default {d.groups})")
    _add(g, "--free", help="free filters per layer, same syntax (default: the remainder channels %% G)")
    _add(g, "--lambda-bn", type=float, help=f"weight of the block norm R_bn (default {d.lambda_bn})")
    _add(g, "--lambda-g", type=float, help=f"weight of the group activation loss L_g (default {d.lambda_g})")
    _add(g, "--lambda-s", type=float, help=f"weight of the spatial loss L_s (default {d.lambda_s})")
    _add(g, "--pairs-per-filter", type=int, help=f"r = this * f pairs per group and step (default {d.pairs_per_filter})")
    _add(g, "--group-form", choices=GROUP_FORMS,
         help=f"L_g norms over batch+space ('paper') or per image (authors' code) (default {d.group_form})")
    _add(g, "--spatial-coords", choices=SPATIAL_COORDS, help=f"L_s coordinates (default {d.spatial_coords})")
    _add(g, "--spatial-layers", help=f"'grouped', 'last' or conv names for L_s (default {d.spatial_layers})")
    _add(g, "--learn-p", action="store_true", help="learn the shared P1, P2 of psi (default fixed 1, 0)")
    _add(g, "--prox", action="store_true",
         help="apply R_bn as a group soft-threshold (lr * lambda_bn) after each step instead of its gradient")
    _add(g, "--no-monitor", dest="monitor", action="store_false",
         help="do not compute the terms whose lambda is 0 for the log (faster)")
    g = p.add_argument_group("run")
    _add(g, "--seed", type=int, help=f"seeds init, data order, augmentation and pairs (default {d.seed})")
    _add(g, "--workers", type=int, help=f"DataLoader workers for an ImageFolder --data; no effect on results "
                                      f"(augmentation is seeded per sample); the synthetic set is served from memory "
                                      f"without workers (default {d.workers})")
    _add(g, "--device", help=f"'auto', 'cpu', 'cuda', 'cuda:N' (default {d.device})")
    _add(g, "--val-every", type=int, help=f"validate every N epochs and after the last (default {d.val_every})")
    _add(g, "--max-train-batches", type=int, help="stop each epoch after N batches (smoke runs)")
    _add(g, "--max-val-batches", type=int, help="validate on N batches only (smoke runs)")
    _add(g, "--resume", action="store_true",
         help="continue the run in --out from latest.pth, exactly, with its recorded options (see below)")
    _add(g, "--quiet", action="store_true", help="no progress bars or info messages")
    return p


def recorded_options(out: str | Path) -> tuple[dict[str, Any], str]:
    """(train options, where they were read) of the run in `out`: config.json, else latest.pth."""
    out = Path(out)
    path = out / "config.json"
    if path.is_file():
        return TrainConfig.from_json(path).to_dict(), str(path)
    latest = out / "latest.pth"
    if latest.is_file():
        from cgl_train.checkpoint import load_checkpoint

        options = load_checkpoint(latest).get("train_options")
        if not isinstance(options, dict) or not options:
            raise CheckpointError(f"{latest}: field 'train_options' is missing or empty; cannot resume "
                                  f"without the run's options")
        return TrainConfig.from_dict(options, f"{latest} train_options").to_dict(), str(latest)
    raise InputError(f"--resume: no run to resume in --out {out} (neither config.json nor latest.pth)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then --config JSON, then the flags given; validated.

    With --resume the base is the run's recorded options (`recorded_options`)
    and --config values and flags may change only RESUME_MAY_DIFFER.
    """
    given = vars(args).copy()
    path = given.pop("config", None)
    if given.get("resume"):
        return _resume_config(given, path)
    base = TrainConfig.from_json(path).to_dict() if path else TrainConfig().to_dict()
    return _merge(base, given)


def _resume_config(given: dict[str, Any], path: str | None) -> TrainConfig:
    overrides: dict[str, Any] = {}
    if path:
        TrainConfig.from_json(path)  # validates the file; errors name it
        # only the keys the file sets override the recorded run, not the defaults it was filled with
        overrides = json.loads(Path(path).read_text())
    out = given.get("out") or overrides.get("out") or TrainConfig().out
    recorded, source = recorded_options(out)
    config = _merge({**recorded, **overrides, "out": out}, given)
    check_resumable(recorded, config, f"--resume (options recorded in {source})")
    return config


def _merge(base: dict[str, Any], given: dict[str, Any]) -> TrainConfig:
    base, given = dict(base), dict(given)
    if "layers" in given:
        given["layers"] = [s.strip() for s in given["layers"].split(",") if s.strip()]
    for option, default_key, table_key in (("groups", "groups", "group_overrides"),
                                           ("free", "free", "free_overrides")):
        if option in given:
            default, per_layer = parse_layer_ints(given.pop(option), f"--{option}")
            if default is not None:
                given[default_key] = default
            given[table_key] = {**base.get(table_key, {}), **per_layer}
    base.update(given)
    return TrainConfig.from_dict(base, "command line")


def main(argv: Sequence[str] | None = None) -> int:
    """Run `cgl-train`; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: 2 on a bad flag, 0 for --help
        return int(e.code or 0)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        config = config_from_args(args)
        logging.basicConfig(level=logging.WARNING if config.quiet or not rank0 else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
        from dissect.progress import set_quiet
        from cgl_train.engine import train  # late: keeps --help fast

        set_quiet(config.quiet)
        result = train(config)
    except (InputError, CheckpointError) as e:
        print(f"cgl-train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cgl-train: interrupted; continue with --resume", file=sys.stderr)
        return 1
    except Exception as e:  # an unexpected failure: say what, keep the traceback in the log
        logging.getLogger("cgl_train").exception("training failed")
        print(f"cgl-train: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if rank0:
        m = result.metrics
        world = env_world_size()
        print(f"trained {result.epochs_completed} epoch(s)" + (f" on {world} processes" if world > 1 else "")
              + f"; val top-1 {m.get('val_top1')}, top-5 {m.get('val_top5')}")
        print(f"checkpoint: {result.latest}")
        if result.best is not None:
            print(f"best checkpoint: {result.best}")
        print(f"log: {result.out / 'log.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
