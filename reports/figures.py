"""Matplotlib figures of the reports, each saved as a PNG file.

Figures are built with the object-oriented API (matplotlib.figure.Figure), so
no pyplot state or global backend is touched.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.figure import Figure

from broden._fileio import atomic_path
from reports.results import is_detector, shown_label

__all__ = ["save_figure", "detector_counts", "detectors_bar_chart", "layer_category_counts",
           "detectors_by_layer_chart", "group_bubble_plot",
           "compare_bar_chart", "CATEGORY_COLORS"]

log = logging.getLogger(__name__)

CATEGORY_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860",
                   "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd"]


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Save `fig` as PNG at `path` atomically and return the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        # No "Software" tag: matplotlib's carries its web address, and report files hold no URL.
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return path


def detector_counts(units: Sequence[Mapping[str, Any]], categories: Sequence[str],
                    rule: tuple[float, str]) -> list[tuple[str, str, int]]:
    """(category, label, number of detector units) by top label, grouped by category in
    `categories` order, labels by count descending then name (the reference bar chart's order)."""
    counts = Counter((u.get("category") or "", shown_label(u.get("label"))) for u in units
                     if u.get("iou") is not None and is_detector(float(u["iou"]), rule))
    rank = {c: i for i, c in enumerate(list(categories) + sorted({c for c, _ in counts} - set(categories)))}
    ordered = sorted(counts.items(), key=lambda kv: (rank[kv[0][0]], -kv[1], kv[0][1]))
    return [(c, label, n) for (c, label), n in ordered]


def detectors_bar_chart(units: Sequence[Mapping[str, Any]], categories: Sequence[str],
                        rule: tuple[float, str], path: str | Path, title: str = "") -> Path:
    """Bar chart of detectors per label, grouped and coloured by category; saved at `path`."""
    rows = detector_counts(units, categories, rule)
    fig = Figure(figsize=(max(4.0, 0.28 * len(rows) + 1.5), 3.2))
    ax = fig.add_subplot()
    if not rows:
        ax.text(0.5, 0.5, "no detectors", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
    else:
        cats = list(dict.fromkeys(c for c, _, _ in rows))
        colors = {c: CATEGORY_COLORS[i % len(CATEGORY_COLORS)] for i, c in enumerate(cats)}
        ax.bar(range(len(rows)), [n for _, _, n in rows], color=[colors[c] for c, _, _ in rows])
        ax.set_xticks(range(len(rows)), [label for _, label, _ in rows], rotation=90, fontsize=8)
        ax.set_xlim(-0.6, len(rows) - 0.4)
        for c in cats:
            xs = [i for i, row in enumerate(rows) if row[0] == c]
            ax.bar(0, 0, color=colors[c], label=f"{c} ({len(xs)})")
        ax.legend(fontsize=8, frameon=False, title="category (labels)", title_fontsize=8,
                  loc="upper left", bbox_to_anchor=(1.0, 1.0))
    threshold, op = rule
    ax.set_ylabel(f"units (IoU {op} {threshold:g})")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def layer_category_counts(layers: Sequence[Mapping[str, Any]], categories: Sequence[str]
                          ) -> list[tuple[str, dict[str, int]]]:
    """(layer name, {category: detectors}) in layer order, from summary.json layer entries
    (`detectors_per_category`); every category of `categories` present (0 when absent), then any other."""
    extra = sorted({c for m in layers for c in (m.get("detectors_per_category") or {})} - set(categories))
    return [(str(m["name"]), {c: int((m.get("detectors_per_category") or {}).get(c, 0))
                              for c in list(categories) + extra}) for m in layers]


def detectors_by_layer_chart(layers: Sequence[Mapping[str, Any]], categories: Sequence[str],
                             rule: tuple[float, str], path: str | Path) -> Path:
    """Stacked bars: one bar per layer (network order), one segment per category of its detectors'
    top labels, the total written above each bar; saved at `path`."""
    rows = layer_category_counts(layers, categories)
    cats = list(rows[0][1]) if rows else list(categories)
    fig = Figure(figsize=(max(4.0, 1.2 + 0.9 * len(rows)), 3.4))
    ax = fig.add_subplot()
    xs = list(range(len(rows)))
    bottom = [0] * len(rows)
    for i, c in enumerate(cats):
        heights = [counts[c] for _, counts in rows]
        ax.bar(xs, heights, bottom=bottom, color=CATEGORY_COLORS[i % len(CATEGORY_COLORS)], label=c, width=0.6)
        bottom = [b + h for b, h in zip(bottom, heights)]
    for x, total in zip(xs, bottom):
        ax.text(x, total, str(total), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, [name for name, _ in rows], rotation=30 if len(rows) > 6 else 0, fontsize=8)
    threshold, op = rule
    ax.set_ylabel(f"detectors (IoU {op} {threshold:g})")
    ax.set_ylim(0, max(bottom + [1]) * 1.15)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title("detectors per layer, by the category of their top label", fontsize=10)
    ax.legend(fontsize=8, frameon=False, title="category", title_fontsize=8, loc="upper left",
              bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path)


def group_bubble_plot(layers: Sequence[tuple[str, Sequence[Mapping[str, Any]] | None]],
                      path: str | Path) -> Path | None:
    """Concept groups: layers across, aligned concepts down, bubble area ~ relevance (paper Fig. 4).

    Groups aligned to the same concept in one layer are summed into one bubble. Returns None
    when no group is aligned to a concept.
    """
    cells: dict[tuple[str, str], float] = {}
    concept_cat: dict[str, str] = {}
    layer_names = [name for name, groups in layers if groups]
    for name, groups in layers:
        for g in groups or []:
            concept = g.get("aligned_concept")
            if concept is None:
                continue
            cells[(name, concept)] = cells.get((name, concept), 0.0) + float(g.get("relevance") or 0.0)
            concept_cat.setdefault(concept, g.get("aligned_category") or "")
    if not cells:
        return None
    concepts = sorted(concept_cat, key=lambda c: (concept_cat[c], c))
    biggest = max(cells.values()) or 1.0
    fig = Figure(figsize=(1.2 + 1.1 * len(layer_names), 1.0 + 0.38 * len(concepts)))
    ax = fig.add_subplot()
    xs, ys, sizes = [], [], []
    for (name, concept), rel in cells.items():
        xs.append(layer_names.index(name))
        ys.append(concepts.index(concept))
        sizes.append(30 + 900 * rel / biggest)
    ax.scatter(xs, ys, s=sizes, alpha=0.6, color="#4c72b0", edgecolors="#1f3a60")
    ax.set_xticks(range(len(layer_names)), layer_names)
    ax.set_yticks(range(len(concepts)), [f"{c} ({concept_cat[c]})" if concept_cat[c] else c
                                         for c in concepts], fontsize=8)
    ax.set_xlim(-0.6, len(layer_names) - 0.4)
    ax.set_ylim(len(concepts) - 0.4, -0.6)
    ax.set_title(f"concept groups (bubble area ~ relevance, max {biggest:.3g})", fontsize=10)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def compare_bar_chart(run_names: Sequence[str], layer_names: Sequence[str],
                      values: Sequence[Sequence[float | None]], path: str | Path, ylabel: str,
                      errors: Sequence[Sequence[float | None]] | None = None) -> Path:
    """Grouped bars: one group per layer, one bar per run (values[run][layer]; None = absent).

    `errors[run][layer]`, when given, draws an error bar of that half-length (the spread over seeds).
    """
    fig = Figure(figsize=(max(4.0, 1.0 + 0.9 * len(layer_names) * max(1, len(run_names)) / 2), 3.2))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(run_names))
    for r, name in enumerate(run_names):
        xs = [i + (r - (len(run_names) - 1) / 2) * width for i in range(len(layer_names))]
        yerr = None
        if errors is not None and any(e is not None for e in errors[r]):
            yerr = [e if e is not None else 0.0 for e in errors[r]]
        ax.bar(xs, [v if v is not None else 0 for v in values[r]], width=width, label=name, yerr=yerr,
               capsize=3 if yerr else 0, color=CATEGORY_COLORS[r % len(CATEGORY_COLORS)])
    ax.set_xticks(range(len(layer_names)), layer_names)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path)


def iou_distributions(ious: Mapping[str, Mapping[str, Sequence[float]]], layer_names: Sequence[str],
                      path: str | Path, thresholds: Sequence[float] = ()) -> Path:
    """One panel per layer: the distribution of units' top-label IoU for each run (a step histogram of the
    fraction of units), with the detector thresholds as dashed lines. ious[run][layer] -> values."""
    fig = Figure(figsize=(3.2 * max(1, len(layer_names)) + 1.6, 2.8))
    axes = fig.subplots(1, max(1, len(layer_names)), squeeze=False)[0]
    top = max([max(v, default=0.0) for per in ious.values() for v in per.values()] + [max(thresholds, default=0.0)])
    edges = [i * max(top, 1e-6) * 1.05 / 30 for i in range(31)]
    for ax, layer in zip(axes, layer_names):
        for r, (name, per) in enumerate(ious.items()):
            values = list(per.get(layer, []))
            if values:
                ax.hist(values, bins=edges, histtype="step", linewidth=1.4, label=name,
                        weights=[1.0 / len(values)] * len(values), color=CATEGORY_COLORS[r % len(CATEGORY_COLORS)])
        for t in thresholds:
            ax.axvline(t, color="#666666", linestyle="--", linewidth=0.8)
        ax.set_title(layer, fontsize=10)
        ax.set_xlabel("top-label IoU of a unit")
    axes[0].set_ylabel("fraction of units")
    axes[-1].legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path)
