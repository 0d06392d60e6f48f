"""A tiny, seeded results directory that follows docs/contracts.md "Dissection results" to the letter.

The "dissection" is random but self-consistent: IoUs are drawn at random and
every count in summary.json is then derived from them with plain loops, so
tests of the reports compare rendered numbers against independently written
JSON. The dataset is a real Broden-format directory written with broden.writer.
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from broden.writer import BrodenWriter

CATEGORIES = ["color", "shape"]
LABELS = [(1, "red", "color"), (2, "green", "color"), (3, "blue", "color"),
          (4, "square", "shape"), (5, "circle", "shape")]
RGB = {1: (230, 20, 20), 2: (20, 200, 20), 3: (20, 20, 230)}
THRESHOLD = 0.04
LAYERS = [("conv1", 6, 8), ("conv2", 8, 4)]  # (name, units, map size)


def make_dataset(root: Path, seed: int, n_images: int = 6, size: int = 32) -> Path:
    """Write a Broden-format dir of `n_images` images, one coloured square or disc each."""
    rng = np.random.default_rng(seed)
    writer = BrodenWriter(root, CATEGORIES)
    for number, name, cat in LABELS:
        writer.add_label(number, name)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n_images):
        color = int(rng.integers(1, 4))
        shape = int(rng.integers(4, 6))
        cy, cx = rng.integers(8, size - 8, size=2)
        r = int(rng.integers(4, 8))
        inside = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r) if shape == 4 else \
            (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        image = np.full((size, size, 3), 255, dtype=np.uint8)
        image[inside] = RGB[color]
        half = inside[::2, ::2]
        writer.add_image(f"img{i:02d}", image, layers={"color": [np.where(half, color, 0)],
                                                        "shape": [np.where(half, shape, 0)]})
    writer.close()
    return root


def _layer(rng: np.random.Generator, name: str, U: int, hw: int, k: int, n_images: int,
           image_paths: list[str], groups: bool) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    L = len(LABELS)
    iou = rng.uniform(0.0, 0.12, size=(U, L)).astype(np.float32)
    thresholds = rng.uniform(0.3, 0.7, size=U).astype(np.float32)
    top_acts = rng.uniform(0.0, 1.0, size=(U, k, hw, hw)).astype(np.float32)
    units = []
    for u in range(U):
        per_cat = {}
        for cat in CATEGORIES:
            cols = [j for j, lab in enumerate(LABELS) if lab[2] == cat]
            best = max(cols, key=lambda j: iou[u, j])
            per_cat[cat] = {"label": LABELS[best][1], "label_id": LABELS[best][0], "iou": float(iou[u, best]),
                            "intersection": int(rng.integers(0, 100)), "activation": int(rng.integers(100, 200)),
                            "truth": int(rng.integers(100, 300))}
        top = max(range(L), key=lambda j: iou[u, j])
        chosen = rng.choice(n_images, size=k, replace=False)
        maxes = sorted((float(top_acts[u, j].astype(np.float32).max()) for j in range(k)), reverse=True)
        units.append({"unit": u, "label": LABELS[top][1], "label_id": LABELS[top][0], "category": LABELS[top][2],
                      "iou": float(iou[u, top]), "threshold": float(thresholds[u]), "group": None,
                      "per_category": per_cat,
                      "top_images": [{"index": int(c), "image": image_paths[int(c)], "max_activation": m}
                                     for c, m in zip(chosen, maxes)]})
    det_per_cat = {c: 0 for c in CATEGORIES}
    paper = {c: set() for c in CATEGORIES}
    top_label = {c: set() for c in CATEGORIES}
    detectors = 0
    for u in units:
        if u["iou"] >= THRESHOLD:
            detectors += 1
            det_per_cat[u["category"]] += 1
            top_label[u["category"]].add(u["label"])
        for c in CATEGORIES:
            if u["per_category"][c]["iou"] > THRESHOLD:
                paper[c].add(u["per_category"][c]["label"])
    uniq = {"paper": {"per_category": {c: len(paper[c]) for c in CATEGORIES},
                      "total": sum(len(paper[c]) for c in CATEGORIES)},
            "top_label": {"per_category": {c: len(top_label[c]) for c in CATEGORIES},
                          "total": sum(len(top_label[c]) for c in CATEGORIES)}}
    group_list = None
    if groups:
        group_list = []
        for g, members in enumerate([[0, 1, 2], [3, 4, 5]]):
            for m in members:
                units[m]["group"] = g
            concept = ["red", "square"][g]
            group_list.append({"index": g, "units": members, "relevance": float(rng.uniform(0.5, 2.0)),
                               "relevance_bn": None, "aligned_concept": concept,
                               "aligned_category": "color" if g == 0 else "shape",
                               "score": float(rng.uniform(0, 1)), "detectors": {concept: 1}})
    meta = {"name": name, "dir": name, "num_units": U, "shape": [U, hw, hw], "detectors": detectors,
            "detectors_per_category": det_per_cat, "unique_detectors": uniq,
            "rud": {d: uniq[d]["total"] / U for d in uniq}, "groups": group_list}
    units_json = {"layer": name, "num_units": U, "categories": CATEGORIES, "top_k": k, "units": units}
    return meta, units_json, {"thresholds": thresholds, "top_activations": top_acts, "iou": iou}


def _write_tally(path: Path, units: list[dict[str, Any]]) -> None:
    header = ["unit", "category", "label", "score"]
    for c in CATEGORIES:
        header += [f"{c}-label", f"{c}-truth", f"{c}-activation", f"{c}-intersect", f"{c}-iou"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for u in sorted(units, key=lambda u: -u["iou"]):
            row = [u["unit"] + 1, u["category"], u["label"], f"{u['iou']:.4f}"]
            for c in CATEGORIES:
                p = u["per_category"][c]
                row += [p["label"], p["truth"], p["activation"], p["intersection"], f"{p['iou']:.4f}"]
            w.writerow(row)


def make_results_dir(root: str | Path, seed: int = 0, metrics: dict[str, float] | None = None,
                     model_source: str = "model.pth", k: int = 3, groups: bool = True,
                     dataset_root: Path | None = None, model_kind: str = "state_dict",
                     layer_specs: list[tuple[str, int, int]] | None = None,
                     options: dict[str, Any] | None = None, dataset_fingerprint: str = "ds") -> Path:
    """Write a Broden dataset under root/broden (unless given) and a results dir under root/results."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    if dataset_root is None:
        dataset_root = make_dataset(root / "broden", seed)
    with open(dataset_root / "index.csv") as f:
        image_paths = [row["image"] for row in csv.DictReader(f)]
    out = root / "results"
    out.mkdir(parents=True, exist_ok=True)
    layers = []
    layers_spec = LAYERS if layer_specs is None else layer_specs
    for i, (name, U, hw) in enumerate(layers_spec):
        meta, units_json, arrays = _layer(rng, name, U, hw, k, len(image_paths), image_paths,
                                          groups=groups and i == len(layers_spec) - 1 and U >= 6)
        (out / name).mkdir(exist_ok=True)
        (out / name / "units.json").write_text(json.dumps(units_json, indent=1))
        _write_tally(out / name / "tally.csv", units_json["units"])
        np.save(out / name / "thresholds.npy", arrays["thresholds"])
        np.save(out / name / "top_activations.npy", arrays["top_activations"])
        np.save(out / name / "iou.npy", arrays["iou"])
        layers.append(meta)
    last_two = layers[-2:]
    # the model file's sha256 when it exists, as `dissect run` records it (psi maps check it)
    source = Path(model_source)
    fingerprint = hashlib.sha256(source.read_bytes()).hexdigest() if source.is_file() else f"fp{seed}"
    summary = {
        "format": "dissect-results", "version": 1,
        "options": {"iou_threshold": THRESHOLD, "detector_rule": ">=", "top_k": k, "union": "lite", "seed": seed,
                    **(options or {})},
        "seed": seed,
        "model": {"source": model_source, "kind": model_kind, "arch": "tiny", "fingerprint": fingerprint,
                  "metrics": metrics, "normalization": {"mean": [0, 0, 0], "std": [1, 1, 1]}, "input_size": None},
        "dataset": {"root": str(dataset_root), "fingerprint": dataset_fingerprint, "num_images": len(image_paths),
                    "categories": CATEGORIES},
        "labels": [{"id": n, "name": name, "category": c} for n, name, c in LABELS],
        "versions": {"python": "3", "torch": "2", "numpy": "2", "toolkit": "0.1.0"},
        "timings": {"total": 1.5},
        "layers": layers,
        "rud_last_two": {d: sum(l["unique_detectors"][d]["total"] for l in last_two)
                         / sum(l["num_units"] for l in last_two) for d in ("paper", "top_label")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return out
