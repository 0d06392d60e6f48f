"""`cgl-train`: train a CNN with Concept Group Learning (or the weight-decay baseline).

Exit codes: 0 success, 2 bad input (option, config file, dataset, checkpoint), 130 interrupted
(SIGINT; continue with --resume), 1 anything else.
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
from dissect.checkpoint import CheckpointError
from cgl_train.config import FLAG_GROUPS, RESUME_MAY_DIFFER, TrainConfig, check_resumable
from dissect.options import add_flags
from cgl_train.distributed import env_world_size
from cgl_train.errors import NonFiniteTraining

__all__ = ["build_parser", "config_from_args", "recorded_options", "main"]

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
  cgl-train --data shapes32 --arch tiny_cnn --out runs/s32   (shapes32 written by `dissect synth --out shapes32`)
  cgl-train --data /data/places365 --arch alexnet --out runs/alex --groups 5 --lambda-bn 5e-3 --amp
  torchrun --nproc_per_node 4 -m cgl_train --data /data/imagenet --arch vgg16 --out runs/vgg
  cgl-train --resume --out runs/cgl                 (continue a run with its recorded options)
  cgl-train --resume --out runs/wd --epochs 60      (extend a 'step' or 'constant' schedule run)

exit codes: 0 success, 2 bad input (option, config file, dataset, checkpoint, --out in use),
130 interrupted (Ctrl-C, SIGINT: continue with cgl-train --resume --out DIR), 1 anything else

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


def build_parser() -> argparse.ArgumentParser:
    """The `cgl-train` argument parser (flags override --config, which overrides the defaults)."""
    p = argparse.ArgumentParser(prog="cgl-train", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # every default is SUPPRESS: only flags given on the command line override --config / the dataclass
    p.add_argument("--config", metavar="JSON", default=argparse.SUPPRESS,
                   help="a JSON file of options (TrainConfig fields); flags override it")
    add_flags(p, TrainConfig, suppress=True, groups=FLAG_GROUPS)
    return p


def recorded_options(out: str | Path) -> tuple[dict[str, Any], str]:
    """(train options, where they were read) of the run in `out`: config.json, else latest.pth."""
    out = Path(out)
    path = out / "config.json"
    if path.is_file():
        return TrainConfig.from_json(path).to_dict(), str(path)
    latest = out / "latest.pth"
    if latest.is_file():
        from dissect.checkpoint import load_checkpoint

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
    path = getattr(args, "config", None)
    if getattr(args, "resume", False):
        return _resume_config(args, path)
    base = TrainConfig.from_json(path).to_dict() if path else TrainConfig().to_dict()
    return TrainConfig.from_args(args, base, source="command line")


def _resume_config(args: argparse.Namespace, path: str | None) -> TrainConfig:
    overrides: dict[str, Any] = {}
    if path:
        TrainConfig.from_json(path)  # validates the file; errors name it
        # only the keys the file sets override the recorded run, not the defaults it was filled with
        overrides = json.loads(Path(path).read_text())
    out = getattr(args, "out", None) or overrides.get("out") or TrainConfig().out
    recorded, source = recorded_options(out)
    config = TrainConfig.from_args(args, {**recorded, **overrides, "out": out}, source="command line")
    check_resumable(recorded, config, f"--resume (options recorded in {source})")
    return config


def main(argv: Sequence[str] | None = None) -> int:
    """Run `cgl-train`; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: 2 on a bad flag, 0 for --help
        return int(e.code or 0)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    config = None
    try:
        config = config_from_args(args)
        logging.basicConfig(level=logging.WARNING if config.quiet or not rank0 else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
        from broden._progress import quieted
        from cgl_train.data import resolve_data
        from cgl_train.engine import train, val_text  # late: keeps --help fast

        with quieted(config.quiet):  # for this call only: an in-process caller keeps its own switch
            resolve_data(config)  # --data DIR: a `dissect synth` set or an ImageFolder root, said before any work
            result = train(config)
    except (InputError, CheckpointError) as e:
        print(f"cgl-train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # 130, the shell's code for SIGINT, as `dissect`
        out = config.out if config is not None else getattr(args, "out", None)
        how = f"cgl-train --resume --out {out}" if out else "cgl-train --resume --out DIR"
        print(f"cgl-train: interrupted; continue with {how} (from the last epoch's checkpoint)", file=sys.stderr)
        return 130
    except NonFiniteTraining as e:  # a stated failure: its message says where; no traceback
        print(f"cgl-train: failed: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # an unexpected failure: say what, keep the traceback in the log
        logging.getLogger("cgl_train").exception("training failed")
        print(f"cgl-train: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if rank0:
        m = result.metrics
        world = env_world_size()
        print(f"trained {result.epochs_completed} epoch(s)" + (f" on {world} processes" if world > 1 else "")
              + f"; {val_text(m)}")
        print(f"checkpoint: {result.latest}")
        if result.best is not None:
            print(f"best checkpoint: {result.best}")
        print(f"log: {result.out / 'log.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
