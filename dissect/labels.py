"""Labels, detectors and unique detectors from a layer's IoU matrix (netdissect.md section 2, steps 6-7).

The IoU matrix is indexed by GLOBAL label id (column 0 = unlabeled). Ties follow
NetDissect-Lite: within a category the smallest id wins (numpy argmax), a
category whose best IoU is 0 gets label id 0 ('-'), and between categories the
LAST category with the highest score wins (Lite reads a reversed argsort).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dissect.config import passes_rule

__all__ = ["LayerLabels", "label_units", "unique_detectors", "layer_label_summary"]


@dataclass
class LayerLabels:
    """Per-unit labels of one layer; categories are the selected ones, in order."""

    categories: list[str]
    cat_labels: np.ndarray   # (C, U) int64 global id of each category's best label (0: none)
    cat_scores: np.ndarray   # (C, U) float64 its IoU
    top_category: np.ndarray  # (U,) int64 index into categories
    top_label: np.ndarray    # (U,) int64 global id
    top_score: np.ndarray    # (U,) float64
    detector: np.ndarray     # (U,) bool: top score passes the detector rule

    @property
    def num_units(self) -> int:
        """Number of units of the layer."""
        return int(self.top_label.shape[0])


def label_units(iou: np.ndarray, label_category: np.ndarray, categories: list[str],
                iou_threshold: float = 0.04, detector_rule: str = ">=") -> LayerLabels:
    """Per category argmax label and score, the unit's top label, and detectors.

    `iou` (U, L) by global id; `label_category` (L,) index into `categories`, -1 for
    ids outside the selected categories (and for id 0).
    """
    iou = np.asarray(iou, dtype=np.float64)  # (U, L)
    label_category = np.asarray(label_category, dtype=np.int64)  # (L,)
    num_cats = len(categories)
    # (C, U, L) would be big for Broden (U=4096, L=1198, C=6): loop over the few categories instead.
    cat_labels = np.zeros((num_cats, iou.shape[0]), dtype=np.int64)
    cat_scores = np.zeros((num_cats, iou.shape[0]), dtype=np.float64)
    for c in range(num_cats):
        ids = np.flatnonzero(label_category == c)  # ascending, so argmax ties go to the smallest id
        if ids.size == 0:
            continue
        sub = iou[:, ids]  # (U, Lc)
        best = sub.argmax(axis=1)
        score = sub[np.arange(sub.shape[0]), best]
        cat_labels[c] = np.where(score > 0, ids[best], 0)
        cat_scores[c] = np.where(score > 0, score, 0.0)
    if num_cats:
        # last category among equal maxima, as Lite's reversed argsort
        top_category = num_cats - 1 - cat_scores[::-1].argmax(axis=0)
    else:
        top_category = np.zeros(iou.shape[0], dtype=np.int64)
    units = np.arange(iou.shape[0])
    top_label = cat_labels[top_category, units] if num_cats else np.zeros(iou.shape[0], np.int64)
    top_score = cat_scores[top_category, units] if num_cats else np.zeros(iou.shape[0])
    detector = passes_rule(top_score, iou_threshold, detector_rule) & (top_label > 0)
    return LayerLabels(list(categories), cat_labels, cat_scores, top_category.astype(np.int64),
                       top_label.astype(np.int64), top_score, np.asarray(detector, dtype=bool))


def unique_detectors(labels: LayerLabels, iou_threshold: float = 0.04, detector_rule: str = ">=",
                     unique_rule: str = ">") -> dict[str, dict]:
    """Unique detectors under the 'paper' and 'top_label' definitions (netdissect.md section 2).

    paper: per category, distinct category labels among units whose category score passes
    `unique_rule` (a unit may count in several categories); total = sum over categories.
    top_label: distinct top labels among detectors (`detector_rule`), by the label's category.
    """
    paper: dict[str, int] = {}
    for c, cat in enumerate(labels.categories):
        ok = passes_rule(labels.cat_scores[c], iou_threshold, unique_rule) & (labels.cat_labels[c] > 0)
        paper[cat] = int(np.unique(labels.cat_labels[c][ok]).size)
    top: dict[str, int] = {}
    det = labels.detector
    for c, cat in enumerate(labels.categories):
        sel = det & (labels.top_category == c)
        top[cat] = int(np.unique(labels.top_label[sel]).size)
    return {"paper": {"per_category": paper, "total": int(sum(paper.values()))},
            "top_label": {"per_category": top, "total": int(sum(top.values()))}}


def layer_label_summary(labels: LayerLabels, iou_threshold: float = 0.04, detector_rule: str = ">=",
                        unique_rule: str = ">") -> dict:
    """The per-layer counts of summary.json: detectors, per category, unique detectors, RUD."""
    per_cat = {cat: int(np.count_nonzero(labels.detector & (labels.top_category == c)))
               for c, cat in enumerate(labels.categories)}
    unique = unique_detectors(labels, iou_threshold, detector_rule, unique_rule)
    n = max(labels.num_units, 1)
    return {
        "detectors": int(np.count_nonzero(labels.detector)),
        "detectors_per_category": per_cat,
        "unique_detectors": unique,
        "rud": {k: unique[k]["total"] / n for k in ("paper", "top_label")},
    }
