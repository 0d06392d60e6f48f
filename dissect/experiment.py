"""The paper's synthetic experiment end to end (CGL paper, section 4.1, Table 1).

generate shapes -> train the tiny CNN three ways -> dissect conv1 and conv2 of
each -> table of unique detectors beside the paper's -> reports + comparison.
Every step reuses finished work in the output directory, so an interrupted
demo continues where it stopped.
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
from dissect.fsutil import write_json_atomic, write_text_atomic

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
class ExperimentOptions:
    """Options of `dissect demo`."""

    out: Path = Path("demo-out")          # everything goes here (data, runs, dissections, reports, table)
    full: bool = False                    # the paper's sizes (28,800 images, 30 epochs) instead of the quick preset
    seeds: int = 1                        # training seeds; full mode uses at least 3 (single runs are noisy)
    labeling: str = "binary"              # 'binary' (the paper's Table 1) or 'classes45'
    config: Path | None = None            # experiment config JSON (default: the checked-in cgl_train/configs/table1.json)
    device: str = "auto"                  # training and dissection device
    quiet: bool = False                   # no progress bars
    epochs: int | None = None             # override the preset's epochs (smoke tests)
    per_class: int | None = None          # override the preset's images per class (smoke tests)
    max_train_batches: int | None = None  # cap batches per epoch (smoke tests)
    report: bool = True                   # render the HTML reports and the comparison page


@dataclass
class ExperimentResult:
    """Where the outputs are and the table's numbers."""

    out: Path
    table_md: Path
    table_json: Path
    rows: list[dict[str, Any]]
    reports: dict[str, Path] = field(default_factory=dict)
    compare_html: Path | None = None
    seconds: float = 0.0


def load_config(path: Path | None = None) -> dict[str, Any]:
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
    if n < 1:
        raise InputError(f"--seeds {opts.seeds}: expected a positive number")
    return list(range(n))


def _dataset(cfg: dict[str, Any], opts: ExperimentOptions, mode: str) -> tuple[Path, dict[str, Any]]:
    from broden.synthetic import generate_shapes_dataset

    data = dict(cfg["data"][mode])
    if opts.per_class is not None:
        data["per_class"] = opts.per_class
    root = opts.out / "data" / f"shapes-{data['size']}px-{data['per_class']}pc-seed{data['seed']}"
    generate_shapes_dataset(root, per_class=data["per_class"], size=data["size"], seed=data["seed"],
                            val_fraction=data["val_fraction"], progress=not opts.quiet)
    return root, data


def _train(cfg: dict[str, Any], opts: ExperimentOptions, mode: str, run: str, seed: int,
           data_root: Path, data: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Train one configuration (or reuse/resume it); returns the checkpoint and its metrics."""
    from cgl_train.checkpoint import load_checkpoint
    from cgl_train.config import TrainConfig
    from cgl_train.engine import train

    values = {**cfg["train"]["common"], **cfg["train"][mode], **cfg["runs"][run]}
    if opts.epochs is not None:
        values["epochs"] = opts.epochs
    out = opts.out / "runs" / f"{run}-seed{seed}"
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
    from dissect.cli import main as dissect_main

    argv = ["run", str(checkpoint), "--dataset", str(data_root), "--out", str(out),
            "--layers", *cfg["dissect"]["layers"], "--seed", str(seed), "--device", opts.device,
            "--batch-size", str(cfg["dissect"].get("batch_size", 64)), "--no-report"]
    if opts.quiet:
        argv.append("--quiet")
    code = dissect_main(argv)
    if code != 0:
        raise RuntimeError(f"dissect run failed with exit code {code} for {checkpoint}")
    return json.loads((out / "summary.json").read_text())


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
    if opts.labeling not in ("binary", "classes45"):
        raise InputError(f"--labeling {opts.labeling!r}: expected binary or classes45")
    start = time.time()
    cfg = load_config(opts.config)
    mode = "full" if opts.full else "quick"
    opts.out.mkdir(parents=True, exist_ok=True)
    seeds = _seeds(opts)
    data_root, data = _dataset(cfg, opts, mode)

    summaries: dict[tuple[str, int], dict[str, Any]] = {}
    metrics: dict[tuple[str, int], dict[str, Any]] = {}
    dissect_dirs: dict[tuple[str, int], Path] = {}
    for seed in seeds:
        for run in RUNS:
            log.info("training %s (seed %d)", RUN_TITLES[run], seed)
            ckpt, metrics[(run, seed)] = _train(cfg, opts, mode, run, seed, data_root, data)
            dissect_dirs[(run, seed)] = opts.out / "dissect" / f"{run}-seed{seed}"
            log.info("dissecting %s (seed %d)", RUN_TITLES[run], seed)
            summaries[(run, seed)] = _dissect(cfg, opts, ckpt, data_root, dissect_dirs[(run, seed)], seed)

    tables = {d: table_rows(summaries, metrics, seeds, d) for d in DEFINITIONS}
    rows = tables["paper"]
    table = "\n".join(format_table(tables[d], opts.labeling) for d in DEFINITIONS)
    result = ExperimentResult(out=opts.out, table_md=opts.out / "table1.md",
                              table_json=opts.out / "table1.json", rows=rows)
    if opts.report:
        from reports.compare import compare_runs, write_comparison
        from reports.render import render_report

        for run in RUNS:
            result.reports[run] = render_report(dissect_dirs[(run, seeds[0])])
        cmp = compare_runs([dissect_dirs[(r, seeds[0])] for r in RUNS], names=[RUN_TITLES[r] for r in RUNS])
        result.compare_html = opts.out / "compare.html"
        write_comparison(cmp, "html", result.compare_html)
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
