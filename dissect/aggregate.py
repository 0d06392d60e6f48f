"""Numbers over several dissections: runs grouped by configuration, mean and spread over seeds, paired
differences against a baseline, and the counts at any IoU threshold.

A *group* is one configuration (e.g. "R_bn + L_g + L_s"); its runs differ by seed. Counts at a
threshold other than the one a run used are recomputed from its units.json (each unit's best label
and IoU per category) with the same functions the dissection uses (dissect.labels), so at the
run's own threshold they equal summary.json's. Both `dissect demo` (cgl_train.experiment) and
`dissect compare` (reports.compare) build their tables here, and format them with `cell_text`.
"""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from broden._fileio import read_json
from broden.errors import InputError
from dissect.config import passes_rule
from dissect.labels import LayerLabels, layer_label_summary
from dissect.results import read_summary

__all__ = ["RunRecord", "Cell", "Paired", "read_record", "default_group", "layer_labels_from_units",
           "counts_at", "Groups", "group_runs", "cell_text", "paired_text", "DEFINITIONS", "DEFINITION_TEXT",
           "Table", "threshold_table", "spatial_table", "markdown", "DEFAULT_THRESHOLDS", "run_seed"]

DEFINITIONS = ("paper", "top_label")
# IoU thresholds of the detector tables when none are given: NetDissect-Lite's report (0.04) and the
# CGL authors' settings for the synthetic set (0.08)
DEFAULT_THRESHOLDS = (0.04, 0.08)


@dataclass
class RunRecord:
    """One dissection: its group (configuration), seed, summary.json and every layer's units.json units."""

    group: str
    seed: int
    root: Path
    summary: dict[str, Any]
    units: dict[str, dict[str, Any]]   # layer name -> units.json content

    def layer_meta(self, layer: str) -> dict[str, Any] | None:
        """The layer's summary.json entry, None when the run lacks the layer."""
        return next((l for l in self.summary["layers"] if l["name"] == layer), None)

    def metric(self, name: str) -> float | None:
        """A number the model recorded (e.g. val_top1), None when absent."""
        value = (self.summary["model"].get("metrics") or {}).get(name)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def default_group(name: str | Path) -> str:
    """A run's configuration name: its (directory) name without a trailing seed ('rbn-seed2' -> 'rbn')."""
    name = Path(name).name if isinstance(name, Path) else str(name)
    return re.sub(r"[-_.]?seed\d+$", "", name) or name


def run_seed(summary: dict[str, Any]) -> int:
    """A dissection's seed for grouping: the model's training seed where recorded (summary.json writes
    train_seed: null for models that are not cgl-train checkpoints), else the dissection's own."""
    seed = summary["model"].get("train_seed")
    return int(summary["seed"] if seed is None else seed)


def read_record(root: str | Path, group: str | None = None) -> RunRecord:
    """Read summary.json and every layer's units.json; the seed is the model's training seed if recorded."""
    root = Path(root)
    summary = read_summary(root)
    units = {}
    for entry in summary["layers"]:
        units[entry["name"]] = read_json(root / entry["dir"] / "units.json",
                                         "the results directory is incomplete; rerun `dissect run`")
    seed = run_seed(summary)
    return RunRecord(group if group is not None else default_group(root), seed, root, summary, units)


def layer_labels_from_units(units_json: Mapping[str, Any]) -> LayerLabels:
    """The LayerLabels a units.json holds (per-category best labels and IoUs, top labels), detectors unset."""
    cats = list(units_json["categories"])
    units = units_json["units"]
    n = len(units)
    cat_labels = np.zeros((len(cats), n), dtype=np.int64)
    cat_scores = np.zeros((len(cats), n), dtype=np.float64)
    for u, unit in enumerate(units):  # reading a file back: once per unit
        for c, cat in enumerate(cats):
            pc = unit["per_category"][cat]
            cat_labels[c, u], cat_scores[c, u] = int(pc["label_id"]), float(pc["iou"])
    top_category = np.array([cats.index(u["category"]) if u["category"] in cats else 0 for u in units],
                            dtype=np.int64)
    return LayerLabels(cats, cat_labels, cat_scores, top_category,
                       np.array([int(u["label_id"]) for u in units], dtype=np.int64),
                       np.array([float(u["iou"]) for u in units], dtype=np.float64),
                       np.zeros(n, dtype=bool))


def counts_at(units_json: Mapping[str, Any], threshold: float, detector_rule: str = ">=",
              unique_rule: str = ">") -> dict[str, Any]:
    """Detectors, unique detectors (both definitions) and RUD of a layer at IoU `threshold`."""
    labels = layer_labels_from_units(units_json)
    labels.detector = np.asarray(passes_rule(labels.top_score, threshold, detector_rule), dtype=bool) & \
        (labels.top_label > 0)
    return layer_label_summary(labels, threshold, detector_rule, unique_rule)


# ---------------------------------------------------------------- cells over seeds

@dataclass
class Cell:
    """One table cell over seeds: the per-seed values (in seed order) and their mean and spread."""

    seeds: list[int]
    values: list[float]

    @property
    def n(self) -> int:
        """Number of seeds with a value."""
        return len(self.values)

    @property
    def mean(self) -> float:
        """Mean over seeds (NaN when empty)."""
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def sd(self) -> float:
        """Sample standard deviation over seeds (n - 1 divisor; 0 for one seed)."""
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON form: mean, sd, n and every per-seed value."""
        return {"mean": self.mean, "sd": self.sd, "n": self.n,
                "per_seed": {str(s): v for s, v in zip(self.seeds, self.values)}}


@dataclass
class Paired:
    """Per-seed differences a - b over the seeds both cells have, with their sign count."""

    seeds: list[int]
    diffs: list[float]

    @property
    def mean(self) -> float:
        """Mean difference."""
        return statistics.fmean(self.diffs) if self.diffs else math.nan

    @property
    def sd(self) -> float:
        """Sample standard deviation of the differences (0 for one pair)."""
        return statistics.stdev(self.diffs) if len(self.diffs) > 1 else 0.0

    @property
    def signs(self) -> tuple[int, int, int]:
        """(positive, zero, negative) pair counts."""
        return (sum(d > 0 for d in self.diffs), sum(d == 0 for d in self.diffs), sum(d < 0 for d in self.diffs))

    @classmethod
    def of(cls, a: Cell, b: Cell) -> "Paired":
        """Pair a and b by seed."""
        other = dict(zip(b.seeds, b.values))
        seeds = [s for s in a.seeds if s in other]
        return cls(seeds, [a.values[a.seeds.index(s)] - other[s] for s in seeds])

    def to_dict(self) -> dict[str, Any]:
        """JSON form: mean, sd, sign counts and every per-seed difference."""
        pos, zero, neg = self.signs
        return {"mean": self.mean, "sd": self.sd, "n": len(self.diffs), "positive": pos, "zero": zero,
                "negative": neg, "per_seed": {str(s): d for s, d in zip(self.seeds, self.diffs)}}


def _num(x: float, digits: int) -> str:
    if math.isnan(x):
        return "–"
    if digits == 0 or float(x).is_integer():
        return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"
    return f"{x:.{digits}f}"


def cell_text(cell: Cell, digits: int = 1, percent: bool = False) -> str:
    """'12' for one seed; '12.3 ± 0.6' over several (the spread is the sample standard deviation)."""
    scale = 100.0 if percent else 1.0
    if cell.n == 0:
        return "–"
    mean = _num(cell.mean * scale, digits)
    suffix = "%" if percent else ""
    if cell.n == 1:
        return mean + suffix
    return f"{mean}{suffix} ± {cell.sd * scale:.{max(digits, 1)}f}"


def paired_text(p: Paired) -> str:
    """'+2.0 ± 1.0 (3+ 0= 0-)': mean and spread of the per-seed differences and their signs."""
    if not p.diffs:
        return "–"
    pos, zero, neg = p.signs
    spread = f" ± {p.sd:.1f}" if len(p.diffs) > 1 else ""
    return f"{p.mean:+.1f}{spread} ({pos}+ {zero}= {neg}-)"


# ---------------------------------------------------------------- groups

@dataclass
class Groups:
    """Runs grouped by configuration, in first-seen order; values per (group, layer) as Cells."""

    names: list[str]
    runs: dict[str, list[RunRecord]]
    layers: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)

    def seeds(self, group: str) -> list[int]:
        """The seeds of a group's runs, sorted."""
        return sorted(r.seed for r in self.runs[group])

    def cell(self, group: str, value: Any) -> Cell:
        """A Cell of `value(run)` over the group's runs (None or NaN values are left out)."""
        pairs = sorted((r.seed, value(r)) for r in self.runs[group])
        pairs = [(s, float(v)) for s, v in pairs if v is not None and not (isinstance(v, float) and math.isnan(v))]
        return Cell([s for s, _ in pairs], [v for _, v in pairs])

    def counts(self, group: str, layer: str, threshold: float) -> list[tuple[RunRecord, dict[str, Any] | None]]:
        """Each run's counts of `layer` at `threshold` (None when the run lacks the layer)."""
        out = []
        for r in self.runs[group]:
            opts = r.summary["options"]
            out.append((r, counts_at(r.units[layer], threshold, opts.get("detector_rule", ">="),
                                     opts.get("unique_rule", ">")) if layer in r.units else None))
        return out

    def unique(self, group: str, layer: str, definition: str, threshold: float,
               category: str | None = None) -> Cell:
        """Unique detectors (a category's, or the total) of a layer under a definition and threshold."""
        if definition not in DEFINITIONS:
            raise InputError(f"unique-detector definition {definition!r}: expected one of {', '.join(DEFINITIONS)}")
        counted = {id(r): c for r, c in self.counts(group, layer, threshold)}

        def value(r: RunRecord) -> float | None:
            c = counted[id(r)]
            if c is None:
                return None
            block = c["unique_detectors"][definition]
            return block["total"] if category is None else block["per_category"].get(category, 0)
        return self.cell(group, value)

    def detectors(self, group: str, layer: str, threshold: float) -> Cell:
        """Units whose top label passes the detector rule at `threshold`."""
        counted = {id(r): c for r, c in self.counts(group, layer, threshold)}
        return self.cell(group, lambda r: None if counted[id(r)] is None else counted[id(r)]["detectors"])

    def metric(self, group: str, name: str) -> Cell:
        """A recorded model metric (e.g. val_top1) over the group's seeds."""
        return self.cell(group, lambda r: r.metric(name))

    def spatial(self, group: str, layer: str, key: str, detectors_only: bool = False) -> Cell:
        """A layer's mask compactness (key 'components' or 'spread'; dissect.spatial) over seeds."""
        def value(r: RunRecord) -> float | None:
            block = (r.layer_meta(layer) or {}).get("spatial") or {}
            block = block.get("detectors") or {} if detectors_only else block
            return block.get(key)
        return self.cell(group, value)

    def top_ious(self, group: str, layer: str) -> np.ndarray:
        """Every unit's top-label IoU of a layer, pooled over the group's seeds."""
        return np.array([float(u["iou"]) for r in self.runs[group] if layer in r.units
                         for u in r.units[layer]["units"]], dtype=np.float64)


def group_runs(records: Sequence[RunRecord]) -> Groups:
    """Group records by their group name (first-seen order); a seed must not repeat within a group."""
    groups = Groups(names=[], runs={})
    for r in records:
        if r.group not in groups.runs:
            groups.names.append(r.group)
            groups.runs[r.group] = []
        if any(o.seed == r.seed for o in groups.runs[r.group]):
            raise InputError(f"{r.root}: group {r.group!r} already has a run with seed {r.seed}; give the runs "
                             f"distinct names (--names) or seeds")
        groups.runs[r.group].append(r)
        groups.layers += [l["name"] for l in r.summary["layers"] if l["name"] not in groups.layers]
        groups.categories += [c for c in r.summary["dataset"].get("categories") or [] if c not in groups.categories]
    return groups


# ---------------------------------------------------------------- tables

DEFINITION_TEXT = {
    "paper": "per category, distinct labels among units whose best label of that category has IoU > t "
             "(a unit may count in several categories; the CGL paper's scripts)",
    "top_label": "distinct top labels among units whose top label has IoU >= t (each unit counts once, in "
                 "its top label's category; NetDissect-Lite's report)",
}


@dataclass
class Table:
    """A table of cells: header, rows of (text, data) pairs; `data` keeps the numbers behind each cell."""

    id: str
    title: str
    header: list[str]
    rows: list[list[tuple[str, dict[str, Any]]]]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the header and per row the cells' numbers (with their per-seed values)."""
        return {"id": self.id, "title": self.title, "header": self.header, "notes": self.notes,
                "rows": [[data for _, data in row] for row in self.rows]}


def _c(cell: Cell, **data: Any) -> tuple[str, dict[str, Any]]:
    return cell_text(cell), {**data, **cell.to_dict()}


def threshold_table(groups: Groups, definition: str, threshold: float, baseline: str | None = None,
                    reference: Mapping[tuple[str, str], Mapping[str, int]] | None = None,
                    reference_name: str = "paper", titles: Mapping[str, str] | None = None) -> Table:
    """Detectors and unique detectors per group and layer at one IoU threshold, under one definition.

    Cells are mean ± sd over the group's seeds; `baseline` (a group) adds a column of per-seed
    paired differences of the total (group minus baseline); `reference` adds the published numbers
    (per (group, layer): {category: n, "total": n}) as "ours / reference".
    """
    titles = dict(titles or {})
    cats = groups.categories
    header = ["group", "layer"] + cats + ["total", "detectors", "val top-1"]
    if baseline is not None:
        header.append(f"total − {titles.get(baseline, baseline)} (per seed)")
    rows = []
    for g in groups.names:
        for layer in groups.layers:
            ref = (reference or {}).get((g, layer))
            row = [(titles.get(g, g), {"group": g}), (layer, {"layer": layer})]
            for c in cats + [None]:
                text, data = _c(groups.unique(g, layer, definition, threshold, c), group=g, layer=layer,
                                category=c or "", metric=f"unique_{definition}", threshold=threshold)
                if ref is not None:
                    key = c or "total"
                    text, data = f"{text} / {ref.get(key, '–')}", {**data, reference_name: ref.get(key)}
                row.append((text, data))
            row.append(_c(groups.detectors(g, layer, threshold), group=g, layer=layer, metric="detectors",
                          threshold=threshold))
            acc = groups.metric(g, "val_top1")
            row.append((cell_text(acc, digits=1, percent=True), {"group": g, "metric": "val_top1", **acc.to_dict()}))
            if baseline is not None:
                if g == baseline:
                    row.append(("(baseline)", {"group": g, "metric": "paired_total"}))
                else:
                    p = Paired.of(groups.unique(g, layer, definition, threshold),
                                  groups.unique(baseline, layer, definition, threshold))
                    row.append((paired_text(p), {"group": g, "layer": layer, "metric": "paired_total",
                                                 "baseline": baseline, **p.to_dict()}))
            rows.append(row)
    title = f"Unique detectors ({definition} definition, IoU threshold {threshold:g})"
    notes = [f"{definition}: {DEFINITION_TEXT[definition].replace(' t ', f' {threshold:g} ')}",
             "cells: mean ± sample standard deviation over seeds" + (f" / {reference_name}" if reference else "")]
    if baseline is not None:
        notes.append(f"last column: per-seed paired difference of the total against {titles.get(baseline, baseline)}, "
                     f"mean ± sd and the number of seeds where it is positive (+), zero (=) or negative (-)")
    return Table(f"unique-{definition}-{threshold:g}", title, header, rows, notes)


def spatial_table(groups: Groups, titles: Mapping[str, str] | None = None) -> Table:
    """Mask compactness per group and layer (dissect.spatial): components and spread, all units and detectors."""
    titles = dict(titles or {})
    header = ["group", "layer", "components (all units)", "spread (all units)", "components (detectors)",
              "spread (detectors)"]
    rows = []
    for g in groups.names:
        for layer in groups.layers:
            row = [(titles.get(g, g), {"group": g}), (layer, {"layer": layer})]
            for det in (False, True):
                for key in ("components", "spread"):
                    cell = groups.spatial(g, layer, key, det)
                    digits = 2 if key == "components" else 3
                    text = "–" if not cell.n else (f"{cell.mean:.{digits}f}" + (f" ± {cell.sd:.{digits}f}"
                                                                                 if cell.n > 1 else ""))
                    row.append((text, {"group": g, "layer": layer, "metric": f"mask_{key}",
                                       "detectors_only": det, **cell.to_dict()}))
            rows.append(row)
    return Table("spatial", "Mask compactness over each unit's top images", header, rows,
                 ["components: connected regions of a unit's mask (upsampled map > its threshold) per top image; "
                  "spread: mean distance of mask pixels from their centroid over the label map's longer side. "
                  "Means over units, then mean ± sd over seeds. L_s claims to lower both."])


def markdown(table: Table) -> str:
    """A table as GitHub markdown, with its notes under it."""
    lines = [f"### {table.title}", "", "| " + " | ".join(table.header) + " |",
             "|" + "|".join("---" for _ in table.header) + "|"]
    for row in table.rows:
        lines.append("| " + " | ".join(text.replace("|", "\\|") for text, _ in row) + " |")
    lines.append("")
    lines += [f"- {n}" for n in table.notes]
    return "\n".join(lines) + "\n"
