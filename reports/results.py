"""A dissection results directory read back for the views (docs/contracts.md, "Dissection results").

Everything the pages share: the directory read once (RunResults), the detector rule the run
recorded, and safe file names. Nothing here renders; render.py, figures.py, psi.py,
thumbnails.py and compare.py all read from here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from broden._fileio import read_json
from broden.errors import InputError
from dissect.config import DETECTOR_RULES, DissectConfig, passes_rule
from dissect.results import VERSION as RESULTS_VERSION, read_summary

__all__ = ["RunResults", "LayerResults", "read_run", "detector_rule", "is_detector", "safe_name",
           "UNIQUE_DEFINITIONS", "DEFAULT_DETECTOR_THRESHOLD", "DEFAULT_DETECTOR_RULE", "NO_LABEL", "shown_label"]

# Lite's report counts a unit as a detector at IoU >= 0.04 (netdissect.md section 2, step 7).
# the dissection's own defaults, for runs whose summary lacks the options
DEFAULT_DETECTOR_THRESHOLD = DissectConfig().iou_threshold
# How a unit or category without a label name (label.csv has none for it, as for id 0 in Lite's
# files) is shown: an empty name would leave an empty heading and an empty bar-chart tick.
NO_LABEL = "(none)"
DEFAULT_DETECTOR_RULE = DissectConfig().detector_rule
UNIQUE_DEFINITIONS = {
    "paper": "per category, distinct best labels among units scoring > threshold in that "
             "category; total = sum over categories (the CGL paper's scripts)",
    "top_label": "distinct top labels among units whose top label passes the detector rule "
                 "(NetDissect-Lite's report header)",
}


@dataclass
class LayerResults:
    """One layer of a results directory: its summary entry, units.json and array files."""

    meta: dict[str, Any]
    units: dict[str, Any]
    dir: Path

    @property
    def name(self) -> str:
        """The layer's module name, e.g. `features.10`."""
        return str(self.meta["name"])

    def array(self, filename: str, shape_prefix: Sequence[int] | None = None) -> np.ndarray:
        """Load `<layer>/<filename>`; check that its leading dimensions equal `shape_prefix`."""
        path = self.dir / filename
        if not path.is_file():
            raise InputError(f"{path}: missing; a results directory holds it for every layer "
                             "(rerun `dissect run`)")
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise InputError(f"{path}: not a readable .npy array ({e})") from e
        if shape_prefix is not None and tuple(arr.shape[:len(shape_prefix)]) != tuple(shape_prefix):
            raise InputError(f"{path}: shape {tuple(arr.shape)}, expected leading dimensions "
                             f"{tuple(shape_prefix)}")
        return arr


@dataclass
class RunResults:
    """A whole results directory, read once."""

    root: Path
    summary: dict[str, Any]
    layers: list[LayerResults] = field(default_factory=list)

    def layer(self, name: str) -> LayerResults:
        """The layer called `name`; InputError lists the valid names otherwise."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise InputError(f"{self.root}: no layer {name!r}; layers: {[l.name for l in self.layers]}")


def _require(obj: Mapping[str, Any], keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise InputError(f"{where}: missing field(s) {missing}")


def read_run(results_dir: str | Path) -> RunResults:
    """Read summary.json and every <layer>/units.json of a results directory, validating the contract."""
    root = Path(results_dir)
    if not root.is_dir():
        raise InputError(f"{root}: not a directory; expected the --out directory of `dissect run`")
    summary_path = root / "summary.json"
    summary = read_summary(root)
    if summary.get("version") != RESULTS_VERSION:
        raise InputError(f"{summary_path}: field 'version' is {summary.get('version')!r}; "
                         f"this toolkit reads version {RESULTS_VERSION}")
    _require(summary, ["options", "model", "dataset", "labels", "layers"], str(summary_path))
    run = RunResults(root=root, summary=summary)
    for i, meta in enumerate(summary["layers"]):
        where = f"{summary_path}: layers[{i}]"
        _require(meta, ["name", "dir", "num_units", "detectors", "unique_detectors", "rud"], where)
        layer_dir = root / meta["dir"]
        units = read_json(layer_dir / "units.json", "the results directory is incomplete; rerun `dissect run`")
        _require(units, ["layer", "num_units", "units", "top_k"], str(layer_dir / "units.json"))
        if len(units["units"]) != meta["num_units"]:
            raise InputError(f"{layer_dir / 'units.json'}: {len(units['units'])} units, "
                             f"summary.json says num_units={meta['num_units']}")
        run.layers.append(LayerResults(meta=meta, units=units, dir=layer_dir))
    return run


def detector_rule(options: Mapping[str, Any]) -> tuple[float, str]:
    """(threshold, rule) of the detector rule recorded in the run's options (dissect.config names:
    `iou_threshold`, `detector_rule` '>=' or '>'); DissectConfig's defaults when a run lacks them."""
    threshold = options.get("iou_threshold", DEFAULT_DETECTOR_THRESHOLD)
    rule = options.get("detector_rule", DEFAULT_DETECTOR_RULE)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise InputError(f"summary.json options.iou_threshold: expected a number, got {threshold!r}")
    if rule not in DETECTOR_RULES:
        raise InputError(f"summary.json options.detector_rule: expected one of {', '.join(DETECTOR_RULES)}, "
                         f"got {rule!r}")
    return float(threshold), rule


def is_detector(iou: float, rule: tuple[float, str]) -> bool:
    """Whether a unit whose top label scores `iou` is a detector under `rule` = (threshold, op)."""
    threshold, op = rule
    return bool(passes_rule(iou, threshold, op))


def safe_name(name: str) -> str:
    """A file-name-safe version of a layer name (`features.10` stays, `a/b` -> `a_b`)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return cleaned if cleaned.strip(".") else "layer"


def shown_label(name: Any) -> str:
    """A label name for display: NO_LABEL when empty or missing."""
    return str(name) if name not in (None, "") else NO_LABEL
