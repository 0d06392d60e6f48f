"""`dissect run MODEL --dataset D --out DIR`: dissect a model's layers against Broden concepts."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from broden.errors import InputError
from dissect.config import DETECTOR_RULES, INTERPOLATIONS, KEEP_ACTIVATIONS, UNIONS, DissectConfig

# register() must stay cheap (`dissect --help` imports every command): torch, pandas, the pipeline and
# the dataset code are imported inside run().

log = logging.getLogger(__name__)

KNOWN_SYNTHETIC = "synthetic"
SYNTHETIC_DEFAULTS = {"per_class": 640, "size": 64, "seed": 0, "val_fraction": 0.2}  # broden.synthetic's (paper)
ARCH_HELP = ("architecture of a state_dict or TorchScript archive: a torchvision classification model or a "
             "cgl_train model. A bare name is looked up in torchvision first, then cgl_train; prefix it to "
             "pick the registry: 'torchvision:alexnet' or 'cgl:alexnet'")


def register(subparsers: Any) -> None:
    """Add the `run` parser."""
    d = DissectConfig()
    p = subparsers.add_parser(
        "run", help="dissect a model: label every unit of the chosen layers with Broden concepts",
        description="Network Dissection of MODEL (a cgl checkpoint, a state_dict with --arch, a TorchScript "
                    "archive with --arch, or a pickled module with --trust-pickle). TorchScript modules "
                    "refuse forward hooks, so a TorchScript archive needs --arch NAME: its weights are "
                    "loaded into the eager NAME model, which is dissected. Writes DIR/summary.json, and per layer "
                    "tally.csv, units.json, thresholds.npy, top_activations.npy, iou.npy. Works under "
                    "`torchrun --nproc-per-node N` (images are sharded, results identical).")
    p.add_argument("model", metavar="MODEL", help="model file")
    p.add_argument("--dataset", required=True, metavar="D",
                   help="a Broden-format directory, a known name (broden1_224, broden1_227, broden1_384: "
                        "looked up in the cache dir, fetched with --download) or 'synthetic' (the CGL shapes "
                        "set, generated once into the cache dir)")
    p.add_argument("--out", required=True, metavar="DIR", help="results directory")
    g = p.add_argument_group("model")
    g.add_argument("--arch", metavar="NAME", help=ARCH_HELP)
    g.add_argument("--num-classes", type=int, metavar="N",
                   help="outputs of a state_dict's classifier (default: inferred from the weights)")
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a whole pickled module (runs code from the file: only for files you trust)")
    g.add_argument("--layers", nargs="+", metavar="NAME",
                   help="dotted module names (default: the checkpoint's grouped layers, else every Conv2d); "
                        "`dissect layers MODEL` lists them")
    g.add_argument("--normalize", choices=("imagenet", "lite", "none"),
                   help="input normalisation (default: the checkpoint's, else imagenet); given explicitly it "
                        "wins over the checkpoint's (with a warning) and summary.json records what was used")
    g.add_argument("--input-size", type=int, metavar="N",
                   help="resize images to N x N before the model (bilinear, antialiased), e.g. 32 for CIFAR nets")
    m = p.add_argument_group("method (defaults: NetDissect-Lite)")
    m.add_argument("--quantile", "--top-fraction", dest="top_fraction", type=float, default=d.top_fraction,
                   help=f"top fraction of activations above the threshold (default {d.top_fraction})")
    m.add_argument("--interpolation", choices=INTERPOLATIONS, default=d.interpolation,
                   help=f"quantile interpolation (default {d.interpolation}, the reference's)")
    m.add_argument("--union", choices=UNIONS, default=d.union,
                   help="IoU union: lite (category counted where its labels lie under the mask) or original "
                        f"(anywhere in the image); default {d.union}")
    m.add_argument("--iou-threshold", type=float, default=d.iou_threshold,
                   help=f"detector IoU threshold (default {d.iou_threshold})")
    m.add_argument("--detector-rule", choices=DETECTOR_RULES, default=d.detector_rule,
                   help="'>=' as Lite's report (default) or '>' as the paper's scripts")
    m.add_argument("--unique-rule", choices=DETECTOR_RULES, default=d.unique_rule,
                   help=f"rule of the 'paper' unique-detector count (default '{d.unique_rule}')")
    m.add_argument("--categories", nargs="+", metavar="CAT", help="categories to label with (default all)")
    m.add_argument("--split", choices=("train", "val"), help="only this split (default: all images)")
    m.add_argument("--limit", type=int, metavar="N", help="only the first N images (quick looks)")
    m.add_argument("--top-k", type=int, default=d.top_k, help=f"top images kept per unit (default {d.top_k})")
    m.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    c = p.add_argument_group("concept groups")
    c.add_argument("--groups", type=int, metavar="G",
                   help="G equal contiguous groups per layer (default: the checkpoint's groups, if any)")
    c.add_argument("--group-alpha", type=float, default=d.group_alpha,
                   help=f"weight of the detector fraction in the aligned-concept score (default {d.group_alpha})")
    c.add_argument("--group-threshold", type=float, default=d.group_threshold,
                   help=f"score a group needs to be aligned to a concept (default {d.group_threshold})")
    e = p.add_argument_group("execution (no effect on results)")
    e.add_argument("--device", default=d.device, help="auto (cuda when present), cpu, cuda, cuda:N")
    e.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images per batch (default {d.batch_size})")
    e.add_argument("--keep-activations", choices=KEEP_ACTIVATIONS, default=d.keep_activations,
                   help="keep stage-1 activations for stage 2 (auto: when under --activation-budget-mb)")
    e.add_argument("--activation-budget-mb", type=int, default=d.activation_budget_mb,
                   help=f"memory for kept activations (default {d.activation_budget_mb} MiB)")
    e.add_argument("--save-every", type=int, default=d.save_every,
                   help=f"batches between saved states for resuming (default {d.save_every})")
    e.add_argument("--save-interval", dest="save_interval_s", type=float, default=d.save_interval_s,
                   help=f"and at least this many seconds between saves (default {d.save_interval_s:g})")
    e.add_argument("--force", action="store_true", help="recompute even if DIR holds a finished identical run")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.add_argument("--no-report", dest="report", action="store_false",
                   help="skip the HTML report (render it later with `dissect report DIR`)")
    s = p.add_argument_group("data")
    s.add_argument("--cache-dir", type=Path, help="where named datasets, synthetic sets and decoded caches live "
                                                   "(default $DISSECT_CACHE_DIR or ~/.cache/concept-dissect)")
    s.add_argument("--download", action="store_true", help="fetch a named dataset when it is not in the cache dir")
    s.add_argument("--mirror", action="append", default=[], metavar="URL", help="extra base URL for --download")
    s.add_argument("--decoded-cache", choices=("auto", "build", "off"), default="auto",
                   help="decoded image cache: auto (use one if present), build (make it first), off")
    s.add_argument("--synthetic-per-class", type=int, metavar="N",
                   help="--dataset synthetic: images per class (default: the checkpoint's training set when "
                        f"it was trained on synthetic data, else {SYNTHETIC_DEFAULTS['per_class']})")
    s.add_argument("--synthetic-size", type=int, metavar="PX",
                   help="--dataset synthetic: image size (default: the checkpoint's training set, else "
                        f"{SYNTHETIC_DEFAULTS['size']})")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> DissectConfig:
    """The DissectConfig the flags describe (validated)."""
    return DissectConfig(
        top_fraction=args.top_fraction, interpolation=args.interpolation, union=args.union,
        iou_threshold=args.iou_threshold, detector_rule=args.detector_rule, unique_rule=args.unique_rule,
        categories=args.categories, split=args.split, limit=args.limit, top_k=args.top_k,
        batch_size=args.batch_size, seed=args.seed, device=args.device, keep_activations=args.keep_activations,
        activation_budget_mb=args.activation_budget_mb, normalize=args.normalize, input_size=args.input_size,
        layers=args.layers, groups=args.groups, group_alpha=args.group_alpha,
        group_threshold=args.group_threshold, save_every=args.save_every,
        save_interval_s=args.save_interval_s).validate()


def synthetic_source(loaded: Any, per_class: int | None = None,
                     size: int | None = None) -> tuple[dict[str, Any], Path | None]:
    """Parameters of the synthetic set to dissect on, and the checkpoint's own directory if reusable.

    A checkpoint trained with `--data synthetic` names its set in train_options: its
    synthetic_dir is used while it still exists (and no flag overrides), else its parameters
    regenerate the same set. Flags override; without a checkpoint the paper's defaults apply.
    """
    params = dict(SYNTHETIC_DEFAULTS)
    reuse: Path | None = None
    ckpt = getattr(loaded, "checkpoint", None) or {}
    train = ckpt.get("train_options") or {}
    if train.get("data") == KNOWN_SYNTHETIC:
        for key in params:
            if train.get(f"synthetic_{key}") is not None:
                params[key] = train[f"synthetic_{key}"]
        saved = train.get("synthetic_dir")
        if saved and Path(saved).is_dir() and per_class is None and size is None:
            reuse = Path(saved)
    if per_class is not None:
        params["per_class"] = per_class
    if size is not None:
        params["size"] = size
    return params, reuse


def resolve_dataset(name: str, cache_dir: Path | None, download: bool, mirrors: list[str],
                    synthetic: dict[str, Any] | None = None, quiet: bool = False,
                    synthetic_reuse: Path | None = None) -> Path:
    """A Broden directory for --dataset: a path, a known name in the cache dir, or 'synthetic'.

    `synthetic`: per_class/size/seed/val_fraction of the synthetic set (default: the paper's),
    generated once under broden.synthetic.synthetic_dir(cache_dir, ...); `synthetic_reuse`: an
    existing generation to use as is (a checkpoint's training set).
    """
    from broden.cache import default_cache_dir

    path = Path(name).expanduser()
    if path.is_dir():
        return path
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if name == KNOWN_SYNTHETIC:
        from broden.synthetic import generate_shapes_dataset, synthetic_dir

        if synthetic_reuse is not None:
            log.info("dissecting on the checkpoint's training set %s", synthetic_reuse)
            return Path(synthetic_reuse)
        params = {**SYNTHETIC_DEFAULTS, **(synthetic or {})}
        target = synthetic_dir(cache, **params)
        return Path(generate_shapes_dataset(target, **params, progress=not quiet, option="--cache-dir"))
    from broden.download import DATASETS, download_dataset, get_spec

    if name not in DATASETS:
        raise InputError(f"--dataset {name!r}: not a directory, and not a known name "
                         f"({', '.join(sorted(DATASETS))}, {KNOWN_SYNTHETIC})")
    spec = get_spec(name)
    where = cache / "datasets"
    if (where / spec.top_dir / "index.csv").is_file():
        return where / spec.top_dir
    if not download:
        raise InputError(f"--dataset {name}: not found in {where}; add --download to fetch it, or pass "
                         f"the path of an extracted copy (--dataset /path/to/{spec.top_dir})")
    return Path(download_dataset(name, where, mirrors=mirrors, progress=not quiet))


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
    from broden.dataset import BrodenDataset
    from dissect import distributed
    from dissect.hooks import resolve_layers
    from dissect.models import load_model
    from dissect.pipeline import plan_key, resolve_device, run_dissection
    from dissect.progress import set_quiet
    from dissect.results import read_summary

    config = config_from_args(args)
    device = resolve_device(config.device)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.index is None:
        import torch

        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        config.device = str(device)
    ctx = distributed.init_from_env(device)
    set_quiet(args.quiet or not ctx.is_main)

    loaded = load_model(args.model, arch=args.arch, trust_pickle=args.trust_pickle, normalize=args.normalize,
                        input_size=args.input_size, num_classes=args.num_classes)
    if config.layers:
        resolve_layers(loaded.module, config.layers)  # unknown names fail before any work
    synthetic, reuse = synthetic_source(loaded, args.synthetic_per_class, args.synthetic_size)
    root = resolve_dataset(args.dataset, args.cache_dir, args.download, args.mirror, synthetic, args.quiet,
                           synthetic_reuse=reuse)
    if args.decoded_cache == "build" and ctx.is_main:
        from broden.cache import build_cache

        build_cache(root, cache_dir=args.cache_dir, progress=not args.quiet)
    distributed.barrier(ctx)
    cache: Any = "off" if args.decoded_cache == "off" else (args.cache_dir or "auto")
    dataset = BrodenDataset(root, categories=config.categories, split=config.split, limit=config.limit,
                            cache=cache)

    out = Path(args.out)
    key = plan_key(loaded, dataset, config)
    if not args.force and (out / "summary.json").is_file():
        try:
            previous = read_summary(out).get("run_key")
        except InputError:
            previous = None
        if previous == key:
            if ctx.is_main:
                print(f"dissect run: {out} already holds this dissection (same model, layers, dataset and "
                      f"options); reusing it (--force recomputes)")
                if args.report and not (out / "report" / "index.html").is_file():
                    from reports.render import render_report

                    print(f"report: {render_report(out)}")
            return 0
    if ctx.is_main:
        from dissect.models import default_layers
        from dissect.results import remove_stale_outputs

        # before any work: a report or layer folder of an earlier run must not pass for this one's
        remove_stale_outputs(out, config.layers or default_layers(loaded))
    distributed.barrier(ctx)
    res = run_dissection(loaded, dataset, config, out, ctx)
    if ctx.is_main:
        for lr in res.layers:
            c = lr.counts
            print(f"{lr.name}: {lr.labels.num_units} units, {c['detectors']} detectors, unique "
                  f"{c['unique_detectors']['paper']['total']} (paper) / "
                  f"{c['unique_detectors']['top_label']['total']} (top label)")
        print(f"results in {out}")
        if args.report:
            from reports.render import render_report

            print(f"report: {render_report(out)}")
    return 0
