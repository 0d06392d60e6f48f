"""The paper's synthetic experiment end to end (CGL paper, section 4.1, Table 1).

generate shapes -> per seed: the untrained network (the control) and the tiny CNN
trained three ways, each until its validation accuracy plateaus -> dissect conv1
and conv2 of each (the dissection library, dissect.runner) -> tables of detectors
and unique detectors (both definitions, two IoU thresholds) over seeds, with
paired differences against weight decay and the paper's numbers beside ours
(dissect.aggregate, the same tables `dissect compare` prints). Every step reuses
finished work in the output directory, so an interrupted demo continues where it
stopped. The HTML reports and the comparison page are a layer above (reports);
`dissect demo` renders them.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from broden.errors import InputError
from broden._fileio import write_json_atomic, write_text_atomic
from dissect.options import Options, option

log = logging.getLogger(__name__)

CONTROL = "random_init"
TRAINED = ("weight_decay", "rbn", "rbn_lg_ls")
RUNS = (CONTROL, *TRAINED)
RUN_TITLES = {CONTROL: "Random init (untrained)", "weight_decay": "Weight decay", "rbn": "R_bn",
              "rbn_lg_ls": "R_bn + L_g + L_s"}
BASELINE = "weight_decay"
LAYERS = ("conv1", "conv2")
CATEGORIES = ("color", "shape", "color_shape")
# Table 1 of the paper (binary setting): unique detectors color, shape, color-shape, total.
PAPER_TABLE1 = {
    ("weight_decay", "conv1"): (3, 0, 4, 7), ("weight_decay", "conv2"): (3, 0, 7, 10),
    ("rbn", "conv1"): (3, 2, 4, 9), ("rbn", "conv2"): (3, 2, 7, 12),
    ("rbn_lg_ls", "conv1"): (3, 3, 5, 11), ("rbn_lg_ls", "conv2"): (3, 2, 9, 14),
}


def paper_reference() -> dict[tuple[str, str], dict[str, int]]:
    """The paper's Table 1 per (run, layer), keyed by both run names and titles (for dissect.aggregate)."""
    out = {}
    for (run, layer), counts in PAPER_TABLE1.items():
        cells = dict(zip((*CATEGORIES, "total"), counts))
        out[(run, layer)] = out[(RUN_TITLES[run], layer)] = cells
    return out


@dataclass
class ExperimentOptions(Options):
    """Options of `dissect demo`."""

    out: str = option("demo-out", "output directory: data, runs, dissections, reports, table")
    full: bool = option(False, "the paper's sizes: 640 images per class (28,800 images), >= 3 seeds; "
                        "meant for a GPU")
    seeds: int | None = option(None, "training seeds, 0..N-1; every network is retrained per seed and cells "
                               "show mean ± sd (default: the preset's)", low=1, expected="a positive integer or null")
    labeling: str = option("binary", "binary 'a square is present' (the paper's Table 1) or the 45-class setting",
                           choices=("binary", "classes45"))
    config: str | None = option(None, "experiment config JSON (default: cgl_train/configs/table1.json)",
                                metavar="JSON")
    device: str = option("auto", "training and dissection device: auto, cpu, cuda, cuda:N")
    epochs: int | None = option(None, "override the preset's largest number of epochs (smoke runs)", low=1)
    per_class: int | None = option(None, "override the preset's images per class (smoke runs)", low=1)
    max_train_batches: int | None = option(None, "cap batches per epoch (smoke tests)", flag=None, low=1)
    report: bool = option(True, "render the HTML reports and the comparison page; --no-report skips them")
    quiet: bool = option(False, "no progress bars")


@dataclass
class ExperimentResult:
    """Where the outputs are, and the tables."""

    out: Path
    table_md: Path
    table_json: Path
    tables: list[Any]                                     # dissect.aggregate.Table, in table1.md order
    convergence: list[dict[str, Any]]                     # one row per trained (run, seed)
    dissections: dict[tuple[str, int], Path] = field(default_factory=dict)  # (run, seed) -> results dir
    seconds: float = 0.0
    mode: str = "quick"
    seeds: list[int] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=list)    # IoU thresholds of the detector tables


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
    missing = [r for r in TRAINED if r not in cfg["runs"]]
    if missing:
        raise InputError(f"{source}: section 'runs' lacks {missing}; expected {list(TRAINED)}")
    cfg["_source"] = source
    return cfg


def _seeds(cfg: dict[str, Any], opts: ExperimentOptions, mode: str) -> list[int]:
    n = opts.seeds if opts.seeds is not None else int((cfg.get("seeds") or {}).get(mode, 1))
    return list(range(max(n, 3) if opts.full else n))


def _dataset(cfg: dict[str, Any], opts: ExperimentOptions, mode: str) -> tuple[Path, dict[str, Any]]:
    from broden.synthetic import generate_shapes_dataset

    data = dict(cfg["data"][mode])
    if opts.per_class is not None:
        data["per_class"] = opts.per_class
    root = Path(opts.out) / "data" / f"shapes-{data['size']}px-{data['per_class']}pc-seed{data['seed']}"
    generate_shapes_dataset(root, per_class=data["per_class"], size=data["size"], seed=data["seed"],
                            val_fraction=data["val_fraction"], progress=not opts.quiet)
    return root, data


def _train_config(cfg: dict[str, Any], opts: ExperimentOptions, mode: str, run: str, seed: int,
                  data_root: Path, data: dict[str, Any]) -> Any:
    from cgl_train.config import TrainConfig

    # the control is the weight-decay network before any step: the same seeded initial weights
    values = {**cfg["train"]["common"], **cfg["train"][mode], **cfg["runs"][BASELINE if run == CONTROL else run]}
    if opts.epochs is not None:
        values["epochs"] = opts.epochs
    values.update(data="synthetic", synthetic_dir=str(data_root), synthetic_per_class=data["per_class"],
                  synthetic_size=data["size"], synthetic_seed=data["seed"],
                  synthetic_val_fraction=data["val_fraction"], labeling=opts.labeling, seed=seed,
                  out=str(Path(opts.out) / "runs" / f"{run}-seed{seed}"), device=opts.device, quiet=opts.quiet,
                  max_train_batches=opts.max_train_batches)
    return TrainConfig.from_dict(values, cfg["_source"])


def _train(config: Any, run: str) -> tuple[Path, dict[str, Any]]:
    """Train one configuration, or save the untrained control (reusing or resuming finished work)."""
    from cgl_train.engine import save_untrained, train
    from dissect.checkpoint import load_checkpoint

    latest = Path(config.out) / "latest.pth"
    if latest.exists():
        ckpt = load_checkpoint(latest)
        check_reusable(ckpt, config, latest)
        metrics = dict(ckpt.get("metrics") or {})
        done = metrics.get("untrained") if run == CONTROL else (ckpt["epoch"] >= config.epochs or
                                                                metrics.get("stopped"))
        if done:
            log.info("reusing finished run %s", config.out)
            return latest, ckpt
        if run != CONTROL:
            config = config.replace(resume=True)
    path = save_untrained(config) if run == CONTROL else train(config).latest
    return path, load_checkpoint(path)


def check_reusable(ckpt: dict[str, Any], config: Any, path: Path) -> None:
    """InputError when a checkpoint in the output directory was trained with other options than `config`:
    reusing it would report its numbers under this configuration's name (another labeling, data or lambda)."""
    from cgl_train.config import resume_conflicts

    saved, now = dict(ckpt.get("train_options") or {}), config.to_dict()
    differ = resume_conflicts(saved, now)
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k)!r} here, {now.get(k)!r} now" for k in differ)
        raise InputError(f"{path}: this --out holds a run trained with other options ({shown}); give the "
                         f"experiment a new --out (or delete {path.parent} to retrain it)")


def _dissect(cfg: dict[str, Any], opts: ExperimentOptions, checkpoint: Path, data_root: Path,
             out: Path, seed: int) -> dict[str, Any]:
    from dissect.runner import run as dissect_run

    outcome = dissect_run(checkpoint, data_root, out, layers=list(cfg["dissect"]["layers"]), seed=seed,
                          device=opts.device, batch_size=int(cfg["dissect"].get("batch_size", 64)),
                          quiet=opts.quiet)
    return outcome.summary_json


def convergence_row(run: str, seed: int, ckpt: dict[str, Any], config: Any) -> dict[str, Any]:
    """How a trained run ended: epochs, whether the plateau rule stopped it, accuracies and task loss."""
    history = list(ckpt.get("history") or [])
    metrics = dict(ckpt.get("metrics") or {})
    vals = [h.get("val_top1") for h in history if h.get("val_top1") is not None]
    window = vals[-3:]
    return {"run": run, "title": RUN_TITLES[run], "seed": seed, "epochs": int(ckpt["epoch"]),
            "max_epochs": config.epochs, "stopped_by_plateau": metrics.get("stopped") == "plateau",
            "val_top1": metrics.get("val_top1"), "best_val_top1": ckpt.get("best_top1"),
            "train_top1": metrics.get("train_top1"),
            "task_loss_first": history[0].get("task") if history else None,
            "task_loss_last": history[-1].get("task") if history else None,
            "val_top1_last3_span": (max(window) - min(window)) if len(window) == 3 else None,
            "train_seconds": sum(h.get("time") or 0.0 for h in history)}


def convergence_markdown(rows: list[dict[str, Any]], rule: str) -> str:
    """The training table: how long each network trained and how well it learned."""
    lines = ["### Training", "", "| network | seed | epochs | stopped by plateau | val top-1 | train top-1 | "
             "task loss first -> last | val top-1 span, last 3 epochs |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def pct(x: Any) -> str:
            return "–" if x is None else f"{100 * x:.1f}%"
        span = "–" if r["val_top1_last3_span"] is None else f"{100 * r['val_top1_last3_span']:.2f} points"
        loss = ("–" if r["task_loss_first"] is None else
                f"{r['task_loss_first']:.3f} -> {r['task_loss_last']:.3f}")
        lines.append(f"| {r['title']} | {r['seed']} | {r['epochs']} / {r['max_epochs']} | "
                     f"{'yes' if r['stopped_by_plateau'] else 'no'} | {pct(r['val_top1'])} | {pct(r['train_top1'])} "
                     f"| {loss} | {span} |")
    lines += ["", f"- {rule}"]
    return "\n".join(lines) + "\n"


def build_tables(dirs: dict[tuple[str, int], Path], thresholds: Sequence[float]) -> tuple[Any, list[Any]]:
    """The dissections grouped by network (dissect.aggregate) and the tables of table1.md and compare.html."""
    from dissect.aggregate import DEFINITIONS, group_runs, read_record, spatial_table, threshold_table

    groups = group_runs([read_record(path, RUN_TITLES[run]) for (run, _), path in sorted(
        dirs.items(), key=lambda kv: (RUNS.index(kv[0][0]), kv[0][1]))])
    tables = [threshold_table(groups, d, t, baseline=RUN_TITLES[BASELINE], reference=paper_reference())
              for d in DEFINITIONS for t in thresholds]
    return groups, tables + [spatial_table(groups)]


def _plateau_rule(config: Any) -> str:
    if not config.plateau_epochs:
        return f"each network trained for {config.epochs} epochs (no plateau rule)"
    floor = "" if config.plateau_min_top1 is None else f", once it reached {100 * config.plateau_min_top1:g}%"
    return (f"each network trained until its validation top-1 moved less than {100 * config.plateau_delta:g} "
            f"points over {config.plateau_epochs} epochs{floor}, at most {config.epochs} epochs")


def _preamble(mode: str, data: dict[str, Any], seeds: list[int], opts: ExperimentOptions, seconds: float,
              rule: str) -> str:
    n = data["per_class"] * 45
    noise = ("One seed: differences of a few detectors between networks are within the noise of a single "
             "training run; run --seeds 3 for the spread." if len(seeds) == 1 else
             f"{len(seeds)} seeds: cells are mean ± sample standard deviation; the last column pairs each "
             f"network with weight decay of the same seed.")
    return (f"# CGL synthetic experiment (Table 1), {mode} preset\n\n"
            f"{n} images ({data['per_class']} per class of 45, {data['size']} px, val fraction "
            f"{data['val_fraction']}), labeling {opts.labeling}, seeds {', '.join(map(str, seeds))}, device "
            f"{opts.device}, {seconds / 60:.1f} min. {rule[0].upper() + rule[1:]}. {noise} Ours / the paper's "
            f"numbers in every unique-detector cell; the paper does not say which definition or threshold its "
            f"Table 1 used. The untrained network is the control: trained networks should differ from it.\n")


class StepClock:
    """Announces each step of a fixed plan as `[run k/n] what ... ETA ~m min` (log, INFO).

    `kinds` is the plan: one kind per step, in order ("training", "dissecting", ...). The
    ETA sums, over the steps left (this one included), the mean time of the finished steps
    of the same kind: a save takes a second, a training minutes. It is unknown until every
    kind still to come has finished once. Reused steps take almost no time, so a resumed
    experiment's ETA starts low and grows as real work begins.
    """

    def __init__(self, kinds: Sequence[str], clock: Any = time.monotonic) -> None:
        self.kinds = list(kinds)
        self.total = len(self.kinds)
        self.done = 0
        self._clock = clock
        self._began: float | None = None
        self._times: dict[str, list[float]] = {}

    def start(self, what: str) -> str:
        """Mark the previous step finished and announce the next step of the plan, `what`; returns the line."""
        now = self._clock()
        if self._began is not None:
            self._times.setdefault(self.kinds[self.done], []).append(now - self._began)
            self.done += 1
        if self.done >= self.total:
            raise InputError(f"StepClock: a step past the plan's {self.total}: {what!r}")
        self._began = now
        left_kinds = self.kinds[self.done:]
        if any(k not in self._times for k in left_kinds):
            eta = "ETA unknown"
        else:
            left = sum(sum(self._times[k]) / len(self._times[k]) for k in left_kinds)
            eta = f"ETA ~{max(1, round(left / 60))} min" if left >= 30 else "ETA <1 min"
        line = f"[run {self.done + 1}/{self.total}] {what} ... {eta}"
        log.info("%s", line)
        return line


def run_experiment(opts: ExperimentOptions) -> ExperimentResult:
    """Run the whole experiment; see the module docstring."""
    opts.validate()
    start = time.time()
    cfg = load_config(opts.config)
    mode = "full" if opts.full else "quick"
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = _seeds(cfg, opts, mode)
    data_root, data = _dataset(cfg, opts, mode)

    dissect_dirs: dict[tuple[str, int], Path] = {}
    convergence: list[dict[str, Any]] = []
    rule = ""
    # per run and seed: a training (the control: a save), then a dissection
    steps = StepClock([kind for _ in seeds for run in RUNS
                       for kind in ("saving" if run == CONTROL else "training", "dissecting")])
    for seed in seeds:
        for run in RUNS:
            config = _train_config(cfg, opts, mode, run, seed, data_root, data)
            rule = rule or _plateau_rule(_train_config(cfg, opts, mode, BASELINE, seed, data_root, data))
            steps.start(f"{'saving' if run == CONTROL else 'training'} {RUN_TITLES[run]} (seed {seed})")
            ckpt_path, ckpt = _train(config, run)
            if run != CONTROL:
                convergence.append(convergence_row(run, seed, ckpt, config))
            dissect_dirs[(run, seed)] = out / "dissect" / f"{run}-seed{seed}"
            steps.start(f"dissecting {RUN_TITLES[run]} (seed {seed})")
            _dissect(cfg, opts, ckpt_path, data_root, dissect_dirs[(run, seed)], seed)

    from dissect.aggregate import DEFAULT_THRESHOLDS, markdown

    thresholds = list(cfg["dissect"].get("iou_thresholds", DEFAULT_THRESHOLDS))
    _, tables = build_tables(dissect_dirs, thresholds)
    seconds = time.time() - start

    text = _preamble(mode, data, seeds, opts, seconds, rule) + "\n" + convergence_markdown(convergence, rule) \
        + "\n" + "\n".join(markdown(t) for t in tables)
    result = ExperimentResult(out=out, table_md=out / "table1.md", table_json=out / "table1.json", tables=tables,
                              convergence=convergence, dissections=dissect_dirs, seconds=seconds, mode=mode,
                              seeds=seeds, thresholds=thresholds)
    write_text_atomic(result.table_md, text)
    write_json_atomic(result.table_json, {
        "format": "cgl-table1", "version": 2, "labeling": opts.labeling, "mode": mode, "seeds": seeds,
        "config": {k: v for k, v in cfg.items() if not k.startswith("_")}, "config_source": cfg["_source"],
        "data": {**data, "root": str(data_root)}, "device": opts.device, "seconds": round(seconds, 1),
        "training_rule": rule, "convergence": convergence, "tables": [t.to_dict() for t in tables],
        "paper_table1": {f"{r}/{l}": dict(zip((*CATEGORIES, "total"), v)) for (r, l), v in PAPER_TABLE1.items()},
        "dissections": {f"{r}-seed{s}": str(p) for (r, s), p in dissect_dirs.items()},
    })
    return result
