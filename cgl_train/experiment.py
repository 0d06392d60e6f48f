"""The paper's synthetic experiment end to end (CGL paper, section 4.1, Table 1).

generate shapes -> train the tiny CNN three ways -> dissect conv1 and conv2 of
each (the dissection library, dissect.runner) -> table of unique detectors
beside the paper's. Every step reuses finished work in the output directory,
so an interrupted demo continues where it stopped. The HTML reports and the
comparison page are a layer above (reports); `dissect demo` renders them.
"""
from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from broden.errors import InputError
from broden._fileio import write_json_atomic, write_text_atomic
from dissect.options import Options, option

log = logging.getLogger(__name__)

RUNS = ("weight_decay", "rbn", "rbn_lg_ls")
RUN_TITLES = {"weight_decay": "Weight decay", "rbn": "R_bn", "rbn_lg_ls": "R_bn + L_g + L_s"}
LAYERS = ("conv1", "conv2")
CATEGORIES = ("color", "shape", "color_shape")
# Table 1 of the paper (binary setting): unique detectors color, shape, color-shape, total.
PAPER_TABLE1 = {
    ("weight_decay", "conv1"): (3, 0, 4, 7), ("weight_decay", "conv2"): (3, 0, 7, 10),
    ("rbn", "conv1"): (3, 2, 4, 9), ("rbn", "conv2"): (3, 2, 7, 12),
    ("rbn_lg_ls", "conv1"): (3, 3, 5, 11), ("rbn_lg_ls", "conv2"): (3, 2, 9, 14),
}


@dataclass
class ExperimentOptions(Options):
    """Options of `dissect demo`."""

    out: str = option("demo-out", "output directory: data, runs, dissections, reports, table")
    full: bool = option(False, "the paper's sizes: 640 images per class, 30 epochs, >= 3 seeds")
    seeds: int = option(1, "training seeds; mean and spread are reported", low=1)
    labeling: str = option("binary", "binary 'a square is present' (the paper's Table 1) or the 45-class setting",
                           choices=("binary", "classes45"))
    config: str | None = option(None, "experiment config JSON (default: cgl_train/configs/table1.json)",
                                metavar="JSON")
    device: str = option("auto", "training and dissection device: auto, cpu, cuda, cuda:N")
    epochs: int | None = option(None, "override the preset's epochs (smoke runs)", low=1)
    per_class: int | None = option(None, "override the preset's images per class (smoke runs)", low=1)
    max_train_batches: int | None = option(None, "cap batches per epoch (smoke tests)", flag=None, low=1)
    report: bool = option(True, "render the HTML reports and the comparison page; --no-report skips them")
    quiet: bool = option(False, "no progress bars")


@dataclass
class ExperimentResult:
    """Where the outputs are and the table's numbers."""

    out: Path
    table_md: Path
    table_json: Path
    rows: list[dict[str, Any]]
    dissections: dict[tuple[str, int], Path] = field(default_factory=dict)  # (run, seed) -> results dir
    seconds: float = 0.0


def load_config(path: str | Path | None = None) -> dict[str, Any]:
    """Read the experiment config (the checked-in one by default)."""
    if path is None:
        text = resources.files("cgl_train").joinpath("configs/table1.json").read_text()
        source = "cgl_train/configs/table1.json"
    else:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise InputError(f"--config {path}: cannot read: {e}") from e
        source = str(path)
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{source}: not valid JSON: {e}") from e
    for key in ("data", "train", "runs", "dissect"):
        if key not in cfg:
            raise InputError(f"{source}: missing section {key!r} (expected data, train, runs, dissect)")
    missing = [r for r in RUNS if r not in cfg["runs"]]
    if missing:
        raise InputError(f"{source}: section 'runs' lacks {missing}; expected {list(RUNS)}")
    cfg["_source"] = source
    return cfg


def _seeds(opts: ExperimentOptions) -> list[int]:
    n = max(opts.seeds, 3) if opts.full else opts.seeds
    return list(range(n))


def _dataset(cfg: dict[str, Any], opts: ExperimentOptions, mode: str) -> tuple[Path, dict[str, Any]]:
    from broden.synthetic import generate_shapes_dataset

    data = dict(cfg["data"][mode])
    if opts.per_class is not None:
        data["per_class"] = opts.per_class
    root = Path(opts.out) / "data" / f"shapes-{data['size']}px-{data['per_class']}pc-seed{data['seed']}"
    generate_shapes_dataset(root, per_class=data["per_class"], size=data["size"], seed=data["seed"],
                            val_fraction=data["val_fraction"], progress=not opts.quiet)
    return root, data


def _train(cfg: dict[str, Any], opts: ExperimentOptions, mode: str, run: str, seed: int,
           data_root: Path, data: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Train one configuration (or reuse/resume it); returns the checkpoint and its metrics."""
    from dissect.checkpoint import load_checkpoint
    from cgl_train.config import TrainConfig
    from cgl_train.engine import train

    values = {**cfg["train"]["common"], **cfg["train"][mode], **cfg["runs"][run]}
    if opts.epochs is not None:
        values["epochs"] = opts.epochs
    out = Path(opts.out) / "runs" / f"{run}-seed{seed}"
    values.update(data="synthetic", synthetic_dir=str(data_root), synthetic_per_class=data["per_class"],
                  synthetic_size=data["size"], synthetic_seed=data["seed"],
                  synthetic_val_fraction=data["val_fraction"], labeling=opts.labeling, seed=seed,
                  out=str(out), device=opts.device, quiet=opts.quiet,
                  max_train_batches=opts.max_train_batches)
    config = TrainConfig.from_dict(values, cfg["_source"])
    latest = out / "latest.pth"
    if latest.exists():
        ckpt = load_checkpoint(latest)
        if ckpt["epoch"] >= config.epochs:
            log.info("reusing finished training run %s", out)
            return latest, dict(ckpt.get("metrics") or {})
        config = config.replace(resume=True)
    result = train(config)
    return result.latest, dict(load_checkpoint(result.latest).get("metrics") or {})


def _dissect(cfg: dict[str, Any], opts: ExperimentOptions, checkpoint: Path, data_root: Path,
             out: Path, seed: int) -> dict[str, Any]:
    from dissect.runner import run as dissect_run

    outcome = dissect_run(checkpoint, data_root, out, layers=list(cfg["dissect"]["layers"]), seed=seed,
                          device=opts.device, batch_size=int(cfg["dissect"].get("batch_size", 64)),
                          quiet=opts.quiet)
    return outcome.summary


def _val_accuracy(metrics: dict[str, Any]) -> float | None:
    for key in ("val_top1", "top1", "val_acc"):
        if isinstance(metrics.get(key), (int, float)):
            return float(metrics[key])
    return None


def _mean_spread(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


DEFINITIONS = ("paper", "top_label")


def table_rows(summaries: dict[tuple[str, int], dict[str, Any]],
               metrics: dict[tuple[str, int], dict[str, Any]], seeds: Sequence[int],
               definition: str = "paper") -> list[dict[str, Any]]:
    """One row per (run, layer): mean and spread over seeds of the unique detectors under `definition`."""
    rows = []
    for run in RUNS:
        accs = [a for s in seeds if (a := _val_accuracy(metrics[(run, s)])) is not None]
        for layer in LAYERS:
            counts: dict[str, list[float]] = {c: [] for c in (*CATEGORIES, "total")}
            for s in seeds:
                meta = next(l for l in summaries[(run, s)]["layers"] if l["name"] == layer)
                per_cat = meta["unique_detectors"][definition]["per_category"]
                for c in CATEGORIES:
                    counts[c].append(float(per_cat.get(c, 0)))
                counts["total"].append(float(sum(per_cat.get(c, 0) for c in CATEGORIES)))
            row: dict[str, Any] = {"run": run, "regularizer": RUN_TITLES[run], "layer": layer,
                                   "definition": definition, "seeds": list(seeds)}
            for c, vals in counts.items():
                row[c], row[f"{c}_sd"] = _mean_spread(vals)
                row[f"{c}_values"] = vals
            row["val_top1"], row["val_top1_sd"] = _mean_spread(accs) if accs else (math.nan, math.nan)
            paper = PAPER_TABLE1[(run, layer)]
            row["paper"] = dict(zip((*CATEGORIES, "total"), paper))
            rows.append(row)
    return rows


def _fmt(mean: float, sd: float, n: int) -> str:
    if math.isnan(mean):
        return "-"
    text = f"{mean:.0f}" if float(mean).is_integer() else f"{mean:.1f}"
    return text if n == 1 else f"{text} ± {sd:.1f}"


DEFINITION_TEXT = {
    "paper": "paper definition: per category, distinct labels among units whose best label of that "
             "category has IoU > 0.04 (a unit may count in several categories)",
    "top_label": "top-label definition: distinct top labels among units whose top label has IoU >= 0.04 "
                 "(each unit counts once, in its top label's category)",
}


def format_table(rows: list[dict[str, Any]], labeling: str) -> str:
    """Markdown table in the layout of the paper's Table 1, ours beside the paper's (ours / paper)."""
    n = len(rows[0]["seeds"]) if rows else 1
    definition = rows[0]["definition"] if rows else "paper"
    lines = [f"Unique detectors ({DEFINITION_TEXT[definition]}), labeling={labeling}, "
             f"{n} seed(s): ours / paper",
             "",
             "| Regularizer | layer | color | shape | color-shape | Total | val top-1 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = r["paper"] if labeling == "binary" else {k: "-" for k in r["paper"]}
        cells = [f"{_fmt(r[c], r[c + '_sd'], n)} / {paper[c]}" for c in (*CATEGORIES, "total")]
        acc = r["val_top1"]
        acc_text = "-" if math.isnan(acc) else (f"{100 * acc:.1f}%" if n == 1
                                                else f"{100 * acc:.1f}% ± {100 * r['val_top1_sd']:.1f}")
        lines.append(f"| {r['regularizer']} | {r['layer']} | " + " | ".join(cells) + f" | {acc_text} |")
    return "\n".join(lines) + "\n"


def run_experiment(opts: ExperimentOptions) -> ExperimentResult:
    """Run the whole experiment; see the module docstring."""
    opts.validate()
    start = time.time()
    cfg = load_config(opts.config)
    mode = "full" if opts.full else "quick"
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = _seeds(opts)
    data_root, data = _dataset(cfg, opts, mode)

    summaries: dict[tuple[str, int], dict[str, Any]] = {}
    metrics: dict[tuple[str, int], dict[str, Any]] = {}
    dissect_dirs: dict[tuple[str, int], Path] = {}
    for seed in seeds:
        for run in RUNS:
            log.info("training %s (seed %d)", RUN_TITLES[run], seed)
            ckpt, metrics[(run, seed)] = _train(cfg, opts, mode, run, seed, data_root, data)
            dissect_dirs[(run, seed)] = out / "dissect" / f"{run}-seed{seed}"
            log.info("dissecting %s (seed %d)", RUN_TITLES[run], seed)
            summaries[(run, seed)] = _dissect(cfg, opts, ckpt, data_root, dissect_dirs[(run, seed)], seed)

    tables = {d: table_rows(summaries, metrics, seeds, d) for d in DEFINITIONS}
    rows = tables["paper"]
    table = "\n".join(format_table(tables[d], opts.labeling) for d in DEFINITIONS)
    result = ExperimentResult(out=out, table_md=out / "table1.md", table_json=out / "table1.json", rows=rows,
                              dissections=dissect_dirs)
    result.seconds = time.time() - start
    write_text_atomic(result.table_md, table)
    write_json_atomic(result.table_json, {
        "format": "cgl-table1", "labeling": opts.labeling, "mode": mode, "seeds": seeds,
        "config": {k: v for k, v in cfg.items() if not k.startswith("_")}, "config_source": cfg["_source"],
        "data": {**data, "root": str(data_root)}, "device": opts.device, "seconds": round(result.seconds, 1),
        "rows": rows, "rows_top_label": tables["top_label"],
        "dissections": {f"{r}-seed{s}": str(p) for (r, s), p in dissect_dirs.items()},
    })
    return result
