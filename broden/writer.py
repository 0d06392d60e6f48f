"""Write Broden-format directories.

One writer serves the synthetic generator, the test fixtures and the
benchmarks, so every Broden directory this project makes has the same layout
the reader expects (see ../shared/design/netdissect.md, section 1).
"""
from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

__all__ = ["encode_label_png", "BrodenWriter", "LabelSpec"]


def encode_label_png(ids: np.ndarray) -> np.ndarray:
    """Encode a (h, w) array of global label ids as an (h, w, 3) uint8 RGB array (id = R + 256*G)."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() > 65535):
        raise ValueError(f"label ids must lie in 0..65535, got {ids.min()}..{ids.max()}")
    ids = ids.astype(np.int32)
    rgb = np.zeros(ids.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = ids % 256
    rgb[..., 1] = ids // 256
    return rgb


@dataclass
class LabelSpec:
    """One row of label.csv; `coverage` maps category -> coverage (None: computed from the data)."""

    number: int
    name: str
    coverage: dict[str, float] | None = None
    frequency: dict[str, int] | None = None


@dataclass
class _Stats:
    frequency: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    coverage: dict[str, float] = field(default_factory=lambda: defaultdict(float))


class BrodenWriter:
    """Accumulate images and label layers, then write index.csv and the label tables on `close()`.

    Usage: add every label with `add_label`, every image with `add_image`, then `close()`.
    """

    def __init__(self, root: str | Path, categories: Sequence[str]):
        self.root = Path(root)
        self.categories = list(categories)
        self.labels: dict[int, LabelSpec] = {}
        self.rows: list[dict[str, str]] = []
        self.stats: dict[int, _Stats] = defaultdict(_Stats)
        (self.root / "images").mkdir(parents=True, exist_ok=True)

    def add_label(self, number: int, name: str, coverage: Mapping[str, float] | None = None,
                  frequency: Mapping[str, int] | None = None) -> None:
        """Declare a label (global id `number` >= 1). Explicit coverage overrides the measured one."""
        if number < 1:
            raise ValueError("label ids start at 1 (0 means unlabeled)")
        self.labels[number] = LabelSpec(number, name, dict(coverage) if coverage else None,
                                        dict(frequency) if frequency else None)

    def add_image(self, name: str, image: np.ndarray, split: str = "train",
                  layers: Mapping[str, Sequence[np.ndarray]] | None = None,
                  image_labels: Mapping[str, Sequence[int]] | None = None,
                  source: str = "synthetic", image_format: str = "png") -> str:
        """Write one image (H, W, 3 uint8) with its label layers ((sh, sw) id arrays) per category.

        Returns the image path relative to images/.
        """
        layers = dict(layers or {})
        image_labels = dict(image_labels or {})
        unknown = (set(layers) | set(image_labels)) - set(self.categories)
        if unknown:
            raise ValueError(f"unknown categories {sorted(unknown)}; declared: {self.categories}")
        image = np.asarray(image, dtype=np.uint8)
        ih, iw = image.shape[:2]
        rel_image = f"{source}/{name}.{'jpg' if image_format == 'jpg' else image_format}"
        path = self.root / "images" / rel_image
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path, quality=95) if image_format == "jpg" else Image.fromarray(image).save(path)

        sh = sw = None
        row = {"image": rel_image, "split": split, "ih": str(ih), "iw": str(iw)}
        for cat in self.categories:
            entries: list[str] = []
            seen: set[int] = set()  # frequency counts images, not layers
            for k, plane in enumerate(layers.get(cat, [])):
                plane = np.asarray(plane)
                if sh is None:
                    sh, sw = plane.shape
                elif plane.shape != (sh, sw):
                    raise ValueError(f"{name}: label layers differ in size: {plane.shape} vs {(sh, sw)}")
                rel_png = f"{source}/{name}_{cat}.png" if k == 0 else f"{source}/{name}_{cat}_{k}.png"
                Image.fromarray(encode_label_png(plane)).save(self.root / "images" / rel_png)
                entries.append(rel_png)
                ids, counts = np.unique(plane[plane > 0], return_counts=True)
                for i, c in zip(ids.tolist(), counts.tolist()):
                    if i not in seen:
                        self.stats[i].frequency[cat] += 1
                        seen.add(i)
                    self.stats[i].coverage[cat] += c / plane.size
            for lab in image_labels.get(cat, []):
                entries.append(str(int(lab)))
                self.stats[int(lab)].frequency[cat] += 1
                self.stats[int(lab)].coverage[cat] += 1.0
            row[cat] = ";".join(entries)
        if sh is None:  # no pixel layer: label maps are half the image size, as in Broden
            sh, sw = ih // 2, iw // 2
        row["sh"], row["sw"] = str(sh), str(sw)
        self.rows.append(row)
        return rel_image

    def _coverage(self, spec: LabelSpec) -> dict[str, float]:
        if spec.coverage is not None:
            return spec.coverage
        return dict(self.stats[spec.number].coverage)

    def _frequency(self, spec: LabelSpec) -> dict[str, int]:
        if spec.frequency is not None:
            return spec.frequency
        return dict(self.stats[spec.number].frequency)

    def close(self) -> None:
        """Write index.csv, label.csv, category.csv and c_<cat>.csv."""
        missing = sorted(set(self.stats) - set(self.labels))
        if missing:
            raise ValueError(f"label ids used but never declared with add_label: {missing[:10]}")
        header = ["image", "split", "ih", "iw", "sh", "sw"] + self.categories
        with open(self.root / "index.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header)
            w.writeheader()
            w.writerows(self.rows)

        per_cat: dict[str, list[tuple[int, str, int, float]]] = {c: [] for c in self.categories}
        with open(self.root / "label.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["number", "name", "category", "frequency", "coverage", "syns"])
            for number in sorted(self.labels):
                spec = self.labels[number]
                cov, freq = self._coverage(spec), self._frequency(spec)
                cats = [c for c in self.categories if c in cov]
                for c in cats:
                    per_cat[c].append((number, spec.name, int(freq.get(c, 0)), float(cov[c])))
                category = ";".join(f"{c}({int(freq.get(c, 0))})" for c in cats)
                w.writerow([number, spec.name, category, sum(int(freq.get(c, 0)) for c in cats),
                            f"{sum(cov.values()):.6g}", ""])

        with open(self.root / "category.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["name", "first", "last", "count", "frequency"])
            for c in self.categories:
                rows = per_cat[c]
                nums = [r[0] for r in rows]
                n_images = sum(1 for r in self.rows if r[c])
                w.writerow([c, min(nums) if nums else 0, max(nums) if nums else 0, len(rows), n_images])

        for c in self.categories:
            with open(self.root / f"c_{c}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["code", "number", "name", "frequency", "coverage"])
                for code, (number, name, freq, cov) in enumerate(per_cat[c], start=1):
                    w.writerow([code, number, name, freq, f"{cov:.6g}"])
