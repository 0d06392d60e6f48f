"""Dissection results in memory and on disk (docs/contracts.md "Dissection results").

Every file is written atomically; summary.json is written last, so a directory
whose summary.json exists is complete.
"""
from __future__ import annotations

import csv
import io
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from broden.errors import InputError
from broden._fileio import atomic_path, read_json, write_json_atomic, write_text_atomic
from dissect.labels import LayerLabels

__all__ = ["FORMAT", "VERSION", "LayerResult", "DatasetInfo", "DissectionResult",
           "tally_csv_text", "units_json", "summary_json", "write_results", "layer_dirname",
           "remove_stale_outputs", "REPORT_DIRNAME", "LAYER_FILES", "LABEL_STRIP_FILE", "missing_outputs",
           "read_summary", "load_results", "summary_rows", "unit_rows", "read_layer_units"]

log = logging.getLogger(__name__)

FORMAT = "dissect-results"
VERSION = 1
REPORT_DIRNAME = "report"
# A folder holding any of these is a layer folder written by write_results (user files are left alone).
LAYER_MARKERS = ("units.json", "tally.csv", "thresholds.npy")
# Every file write_results puts in a layer folder.
LAYER_FILES = ("tally.csv", "units.json", "thresholds.npy", "top_activations.npy", "iou.npy")
# ... and, unless the run's options say label_strips "off", this one.
LABEL_STRIP_FILE = "label_top_activations.npy"
UNITS_JSON_DEPTH = 2  # units.json: the header's fields and the units list indented, each unit on one line


@dataclass
class DatasetInfo:
    """What the outputs need to know about the dataset."""

    root: str
    fingerprint: str
    num_images: int
    categories: list[str]            # selected categories, in dataset order
    all_categories: list[str]        # every category of the dataset (tally's category indices)
    label_names: list[str]           # by global id ('-' at 0)
    label_category: np.ndarray       # (L,) index into all_categories, -1 for unused ids
    images: list[str]                # image path relative to images/, by dataset index
    dropped_images: int = 0          # rows left out by the images rule (broden.dataset.IMAGE_RULES)
    zero_named: bool = False         # label.csv has a row for id 0 (else Lite names it '')

    def lite_name(self, label: int) -> str:
        """A label's name as NetDissect-Lite writes it: '' for id 0 unless label.csv names it."""
        return "" if label == 0 and not self.zero_named else self.label_names[label]

    def selected_label_category(self) -> np.ndarray:
        """(L,) index into `categories` (selected), -1 for ids outside them."""
        remap = np.array([self.categories.index(c) if c in self.categories else -1
                          for c in self.all_categories] + [-1], dtype=np.int64)
        return remap[np.asarray(self.label_category, dtype=np.int64)]  # -1 indexes the trailing -1

    def label_table(self) -> list[dict[str, Any]]:
        """summary.json 'labels': every label of the selected categories, by id."""
        sel = self.selected_label_category()
        return [{"id": int(i), "name": self.label_names[i], "category": self.categories[sel[i]]}
                for i in np.flatnonzero(sel >= 0)]


@dataclass
class LayerResult:
    """Everything computed for one layer."""

    name: str
    shape: tuple[int, int, int]       # (C, h, w)
    thresholds: np.ndarray            # (U,) float32
    intersection: np.ndarray          # (U, L) int64 by global id
    activation: np.ndarray            # (U, C_all) int64 by dataset category index
    truth: np.ndarray                 # (L,) int64
    iou: np.ndarray                   # (U, L) float64 by global id (0 outside the selected categories)
    top_indices: np.ndarray           # (U, k') int64 dataset indices, k' = min(k, images seen)
    top_scores: np.ndarray            # (U, k') float32 spatial max
    top_maps: np.ndarray              # (U, k', h, w) float32
    labels: LayerLabels
    counts: dict[str, Any]            # labels.layer_label_summary(...)
    groups: list[dict[str, Any]] | None = None
    unit_group: np.ndarray | None = None  # (U,) int64 group per unit, -1 free
    mask_components: np.ndarray | None = None  # (U,) mean connected components of the top images' masks
    mask_spread: np.ndarray | None = None      # (U,) mean spread of those masks (dissect.spatial)
    spatial: dict[str, Any] | None = None      # layer summary of the two (dissect.spatial.layer_spatial_summary)
    given_thresholds: Any = None      # dissect.given_thresholds.GivenThresholds (--thresholds) or None
    # --label-strips on: per unit the top images by intersection with its top label (None when off)
    label_top_indices: np.ndarray | None = None        # (U, k') int64 dataset indices
    label_top_intersections: np.ndarray | None = None  # (U, k') int64; 0 = an empty slot, not shown
    label_top_maps: np.ndarray | None = None           # (U, k', h, w) float32 (zeros in empty slots)

    def exact_thresholds(self) -> np.ndarray:
        """(U,) the thresholds the tally used: a given file's values as stored, else `thresholds`."""
        return self.thresholds if self.given_thresholds is None else self.given_thresholds.values


@dataclass
class DissectionResult:
    """A whole dissection: options, provenance and per-layer results."""

    options: dict[str, Any]
    seed: int
    model: dict[str, Any]
    dataset: DatasetInfo
    layers: list[LayerResult]
    versions: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)
    run_key: str | None = None

    def layer(self, name: str) -> LayerResult:
        """The result of one layer by its dotted name."""
        for lr in self.layers:
            if lr.name == name:
                return lr
        raise KeyError(f"no layer {name!r}; dissected: {[lr.name for lr in self.layers]}")


def layer_dirname(name: str) -> str:
    """Directory name of a layer: its dotted name (safe characters only)."""
    if not name or name in (".", "..") or any(ch in name for ch in "/\\\0"):
        raise InputError(f"layer name {name!r} cannot be a directory name")
    return name


def _num(x: float) -> str:
    """A number the way Lite's csv.DictWriter wrote its numpy float64 values: str(), the shortest repr."""
    return repr(float(x))


def tally_csv_text(lr: LayerResult, ds: DatasetInfo) -> str:
    """Lite's tally.csv, byte for byte: unit (1-based), category, label, score, then 5 columns per category.

    Categories in category.csv order (Lite's filtered OrderedDict); numbers as Lite's float64
    tallies print (`46306.0`, `0.05462962962962951`); CRLF line ends as csv.DictWriter. A
    category whose best IoU is 0 gets id 0, as Lite's argmax: written '' unless label.csv
    names 0, with truth and intersection 0 and the activation of the last selected category
    (Lite's primary category of id 0, which no c_<cat>.csv lists). Rows by score descending;
    equal scores list the higher unit first (a stable sort reversed). Lite's own order of ties
    is numpy's unstable argsort()[::-1], which differs between machines (SIMD sorts).
    """
    lab = lr.labels
    cats = lab.categories
    all_idx = [ds.all_categories.index(c) for c in cats]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    header = ["unit", "category", "label", "score"]
    for c in cats:
        header += [f"{c}-label", f"{c}-truth", f"{c}-activation", f"{c}-intersect", f"{c}-iou"]
    w.writerow(header)
    order = np.argsort(lab.top_score, kind="stable")[::-1]
    for u in order.tolist():  # output formatting, once per unit
        row: list[Any] = [u + 1, cats[lab.top_category[u]] if cats else "",
                          ds.lite_name(int(lab.top_label[u])), _num(lab.top_score[u])]
        for ci, c in enumerate(cats):
            l = int(lab.cat_labels[ci, u])
            cat = all_idx[ci] if l > 0 else all_idx[-1]
            row += [ds.lite_name(l), _num(lr.truth[l]), _num(lr.activation[u, cat]), _num(lr.intersection[u, l]),
                    _num(lab.cat_scores[ci, u])]
        w.writerow(row)
    return buf.getvalue()


def _finite(values: np.ndarray | None, u: int) -> float | None:
    """values[u] as a JSON number, None when absent or NaN (a unit whose top masks are all empty)."""
    if values is None or not np.isfinite(values[u]):
        return None
    return float(values[u])


def units_json(lr: LayerResult, ds: DatasetInfo, top_k: int) -> dict[str, Any]:
    """The per-layer units.json dict of the contract."""
    lab = lr.labels
    cats = lab.categories
    all_idx = [ds.all_categories.index(c) for c in cats]
    exact = lr.exact_thresholds()  # a given float64 threshold is reported as it was used
    units = []
    for u in range(lab.num_units):  # output formatting, once per unit
        per_cat = {}
        for ci, c in enumerate(cats):
            l = int(lab.cat_labels[ci, u])
            per_cat[c] = {"label": ds.label_names[l], "label_id": l, "iou": float(lab.cat_scores[ci, u]),
                          "intersection": int(lr.intersection[u, l]) if l else 0,
                          "activation": int(lr.activation[u, all_idx[ci]]) if l else 0,
                          "truth": int(lr.truth[l]) if l else 0}
        tops = [{"index": int(i), "image": ds.images[int(i)], "max_activation": float(s)}
                for i, s in zip(lr.top_indices[u].tolist(), lr.top_scores[u].tolist()) if i >= 0]
        label_tops = None
        if lr.label_top_indices is not None and lr.label_top_intersections is not None:
            label_tops = [{"index": int(i), "image": ds.images[int(i)], "intersection": int(n)}
                          for i, n in zip(lr.label_top_indices[u].tolist(), lr.label_top_intersections[u].tolist())
                          if n > 0]
        units.append({
            "unit": u,
            "label": ds.label_names[int(lab.top_label[u])],
            "label_id": int(lab.top_label[u]),
            "category": cats[int(lab.top_category[u])] if cats else None,
            "iou": float(lab.top_score[u]),
            "threshold": float(exact[u]),
            "group": None if lr.unit_group is None or lr.unit_group[u] < 0 else int(lr.unit_group[u]),
            "mask_components": _finite(lr.mask_components, u),
            "mask_spread": _finite(lr.mask_spread, u),
            "per_category": per_cat,
            "top_images": tops,
            "label_top_images": label_tops,
        })
    return {"layer": lr.name, "num_units": lab.num_units, "categories": cats, "top_k": top_k,
            "units": units}


def summary_json(res: DissectionResult) -> dict[str, Any]:
    """The summary.json dict of the contract."""
    ds = res.dataset
    layers = []
    for lr in res.layers:
        entry = {"name": lr.name, "dir": layer_dirname(lr.name), "num_units": lr.labels.num_units,
                 "shape": [int(s) for s in lr.shape]}
        entry.update(lr.counts)
        entry["spatial"] = lr.spatial
        entry["groups"] = lr.groups
        entry["thresholds_given"] = None if lr.given_thresholds is None else lr.given_thresholds.record()
        layers.append(entry)
    # CGL Table 3 is over the last two layers (network order, see pipeline.resolve_layers): none with fewer
    last = res.layers[-2:]
    units = sum(lr.labels.num_units for lr in last)
    rud_last_two = None if len(last) < 2 else {
        k: (sum(lr.counts["unique_detectors"][k]["total"] for lr in last) / units if units else 0.0)
        for k in ("paper", "top_label")}
    return {
        "format": FORMAT, "version": VERSION,
        "options": res.options,
        "seed": res.seed,
        "model": res.model,
        "dataset": {"root": ds.root, "fingerprint": ds.fingerprint, "num_images": ds.num_images,
                    "dropped_images": ds.dropped_images, "categories": ds.categories},
        "labels": ds.label_table(),
        "versions": res.versions,
        "timings": res.timings,
        "run_key": res.run_key,
        "layers": layers,
        "rud_last_two": rud_last_two,
    }


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)


def remove_stale_outputs(out: str | Path, layers: list[str]) -> list[Path]:
    """Delete DIR/report/ and every layer folder of an earlier run whose layer is not in `layers`.

    Only folders that look like ours (holding units.json, tally.csv or thresholds.npy) are
    removed, never other user files. Returns the removed paths.
    """
    out = Path(out)
    if not out.is_dir():
        return []
    keep = {layer_dirname(n) for n in layers}
    removed = []
    report = out / REPORT_DIRNAME
    if report.is_dir():
        shutil.rmtree(report)
        removed.append(report)
    for d in sorted(out.iterdir()):
        if (d.is_dir() and not d.is_symlink() and d.name not in keep and d.name != REPORT_DIRNAME
                and any((d / m).is_file() for m in LAYER_MARKERS)):
            shutil.rmtree(d)
            removed.append(d)
    if removed:
        log.info("removed outputs of an earlier run from %s: %s", out, ", ".join(p.name for p in removed))
    return removed


def write_results(res: DissectionResult, out: str | Path) -> Path:
    """Write every layer's files, then summary.json last (all atomic). Returns `out`.

    First removes an earlier run's report and the layer folders this result does not have
    (remove_stale_outputs), so nothing left in `out` describes another dissection.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)  # the directory is incomplete until rewritten
    remove_stale_outputs(out, [lr.name for lr in res.layers])
    sel = res.dataset.selected_label_category()
    label_ids = np.flatnonzero(sel >= 0)
    for lr in res.layers:
        d = out / layer_dirname(lr.name)
        d.mkdir(parents=True, exist_ok=True)
        write_text_atomic(d / "tally.csv", tally_csv_text(lr, res.dataset))
        # one line per unit: indenting every field takes the slow encoder (dumps_json)
        write_json_atomic(d / "units.json", units_json(lr, res.dataset, int(res.options.get("top_k", 0))),
                          depth=UNITS_JSON_DEPTH)
        _save_npy(d / "thresholds.npy", np.asarray(lr.thresholds, dtype=np.float32))
        given = d / "thresholds_given.npy"
        if lr.given_thresholds is not None:  # exact values (float32 ones widen exactly)
            _save_npy(given, np.asarray(lr.given_thresholds.values, dtype=np.float64))
        else:
            given.unlink(missing_ok=True)  # an earlier run's file must not describe this one
        _save_npy(d / "top_activations.npy", np.asarray(lr.top_maps, dtype=np.float32))
        if lr.label_top_maps is not None:
            _save_npy(d / LABEL_STRIP_FILE, np.asarray(lr.label_top_maps, dtype=np.float32))
        else:
            (d / LABEL_STRIP_FILE).unlink(missing_ok=True)  # an earlier run's strips are not this one's
        _save_npy(d / "iou.npy", np.asarray(lr.iou, dtype=np.float64)[:, label_ids].astype(np.float32))
    write_json_atomic(out / "summary.json", summary_json(res))
    log.info("results written to %s", out)
    return out


def read_summary(out: str | Path) -> dict[str, Any]:
    """Read DIR/summary.json; InputError when missing or not a results file."""
    path = Path(out) / "summary.json"
    data = read_json(path, "not a finished dissection directory (the --out of `dissect run`)")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise InputError(f"{path}: field 'format' is {got!r}, expected {FORMAT!r}")
    return data


def missing_outputs(out: str | Path, summary: dict[str, Any]) -> list[Path]:
    """The layer files of summary.json's layers not in `out`: LAYER_FILES, thresholds_given.npy where
    given, and LABEL_STRIP_FILE unless options.label_strips is "off" (a run written before that option
    lacks it, so it is recomputed)."""
    out = Path(out)
    missing = []
    strips = (summary.get("options") or {}).get("label_strips", "on") != "off"
    for entry in summary.get("layers") or []:
        folder = out / str(entry.get("dir") or entry.get("name"))
        names = list(LAYER_FILES) + ([LABEL_STRIP_FILE] if strips else [])
        given = entry.get("thresholds_given")
        if isinstance(given, dict) and given.get("values"):  # a --thresholds run's exact values
            names.append(str(given["values"]))
        missing += [folder / name for name in names if not (folder / name).is_file()]
    return missing


def summary_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per layer of a summary.json dict: units, detectors, unique detectors, RUD, per category."""
    rows = []
    for entry in summary["layers"]:
        row = {"layer": entry["name"], "num_units": entry["num_units"], "detectors": entry["detectors"],
               "unique_paper": entry["unique_detectors"]["paper"]["total"],
               "unique_top_label": entry["unique_detectors"]["top_label"]["total"],
               "rud_paper": entry["rud"]["paper"], "rud_top_label": entry["rud"]["top_label"]}
        row.update({f"detectors_{c}": v for c, v in entry["detectors_per_category"].items()})
        rows.append(row)
    return rows


def unit_rows(layer: str, units: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per unit of a units.json dict: label, IoU, threshold, group, mask fields, per category."""
    rows = []
    for u in units["units"]:
        r = {"layer": layer, "unit": u["unit"], "label": u["label"], "label_id": u["label_id"],
             "category": u["category"], "iou": u["iou"], "threshold": u["threshold"], "group": u["group"],
             "mask_components": u.get("mask_components"), "mask_spread": u.get("mask_spread")}
        for c, pc in u["per_category"].items():
            r[f"{c}-label"] = pc["label"]
            r[f"{c}-iou"] = pc["iou"]
        rows.append(r)
    return rows


def read_layer_units(out: str | Path, entry: dict[str, Any]) -> dict[str, Any]:
    """DIR/<layer>/units.json of one summary.json layer entry; InputError when missing."""
    path = Path(out) / str(entry.get("dir") or entry["name"]) / "units.json"
    if not path.is_file():
        raise InputError(f"{path}: missing (summary.json lists layer {entry['name']!r})")
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("units"), list):
        raise InputError(f"{path}: expected a units.json object with a 'units' list")
    return data


def load_results(out: str | Path) -> dict[str, Any]:
    """Read a results directory: {'summary': one row per layer, 'units': one row per unit of every layer}.

    dissect.load wraps the same tables in a dissect.views.Dissection (with per-unit views).
    """
    import pandas as pd  # late: writing results does not need it

    out = Path(out)
    summary = read_summary(out)
    units = [row for entry in summary["layers"] for row in unit_rows(entry["name"], read_layer_units(out, entry))]
    return {"summary": pd.DataFrame(summary_rows(summary)), "units": pd.DataFrame(units)}
