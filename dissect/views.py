"""The result object of `dissect.run` and `dissect.load`, for notebooks and scripts.

    r = dissect.load("results/r18")
    r.summary                # pandas DataFrame, one row per layer
    r.units                  # pandas DataFrame, one row per unit of every layer
    r.unit("layer4", 17)     # a UnitView: label, IoUs and the top-image strip, inline in Jupyter

A Dissection reads a results directory (docs/contracts.md "Dissection results") or,
for a run without `out`, the in-memory DissectionResult. Tables are built on first
use and arrays are memory-mapped, so holding one is cheap; no repr prints arrays.
Strips are drawn with dissect.strips, the primitives the HTML report uses, so a
notebook shows the same masks as the report.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from broden.errors import InputError
from dissect.results import read_layer_units, read_summary, summary_rows, unit_rows, units_json

__all__ = ["Dissection", "UnitView", "THUMB_HEIGHT"]

THUMB_HEIGHT = 112  # tile height in pixels, the report's default
_JPEG_QUALITY = 85
_PLACEHOLDER_GREY = 160


class Dissection:
    """A finished dissection: tables (`summary`, `units`), per-unit views (`unit`) and the run's record.

    `summary_json` is summary.json's content; `result` the in-memory DissectionResult when the
    run computed it in this process (None when loaded or reused); `is_main` is False on the
    ranks of a torchrun run other than rank 0 (which writes the files).
    """

    def __init__(self, summary_json: dict[str, Any], out: str | Path | None = None, *, reused: bool = False,
                 result: Any = None, is_main: bool = True) -> None:
        self.summary_json = summary_json
        self.out = Path(out) if out is not None else None
        self.reused = bool(reused)
        self.result = result
        self.is_main = bool(is_main)
        self._summary: Any = None
        self._units: Any = None
        self._layer_units: dict[str, dict[str, Any]] = {}
        self._sizes: dict[str, tuple[int, int]] | None = None
        self._sizes_error: str | None = None

    @classmethod
    def from_dir(cls, out: str | Path) -> "Dissection":
        """Read the results directory `out` (InputError when it holds no finished dissection)."""
        return cls(read_summary(out), out)

    # ------------------------------------------------------------------ record

    @property
    def layers(self) -> list[str]:
        """The dissected layers' names, in network order."""
        return [str(e["name"]) for e in self.summary_json.get("layers") or []]

    @property
    def options(self) -> dict[str, Any]:
        """The options the dissection recorded (summary.json 'options')."""
        return dict(self.summary_json.get("options") or {})

    @property
    def dataset_root(self) -> Path | None:
        """The dataset directory recorded in summary.json (where the top images are read from)."""
        root = (self.summary_json.get("dataset") or {}).get("root")
        return Path(root) if root else None

    @property
    def summary(self) -> Any:
        """pandas DataFrame, one row per layer: units, detectors, unique detectors, RUD, per category."""
        if self._summary is None:
            import pandas as pd  # late: `import dissect` and the CLI do not need it

            self._summary = pd.DataFrame(summary_rows(self.summary_json))
        return self._summary

    @property
    def units(self) -> Any:
        """pandas DataFrame, one row per unit of every layer: label, category, IoU, threshold, per category."""
        if self._units is None:
            import pandas as pd

            rows = [row for name in self.layers for row in unit_rows(name, self.layer_units(name))]
            self._units = pd.DataFrame(rows)
        return self._units

    def _entry(self, layer: str) -> dict[str, Any]:
        for e in self.summary_json.get("layers") or []:
            if e["name"] == layer:
                return e
        raise InputError(f"no layer {layer!r} in {self._where()}; dissected layers: {', '.join(self.layers)}")

    def _where(self) -> str:
        return str(self.out) if self.out is not None else "this dissection"

    def _on_disk(self) -> bool:
        # a run's own files, once written, are what a report would show; memory serves out=None
        return self.out is not None and (self.out / "summary.json").is_file()

    def _layer_result(self, layer: str) -> Any:
        if self.result is None:
            raise InputError(f"{self._where()}: no results directory and no in-memory result to read {layer!r} from")
        return self.result.layer(layer)

    def layer_units(self, layer: str) -> dict[str, Any]:
        """The units.json content of `layer` (read once)."""
        entry = self._entry(layer)
        if layer not in self._layer_units:
            if self._on_disk():
                self._layer_units[layer] = read_layer_units(self.out, entry)  # type: ignore[arg-type]
            else:
                res = self.result
                lr = self._layer_result(layer)
                self._layer_units[layer] = units_json(lr, res.dataset, int(res.options.get("top_k", 0)))
        return self._layer_units[layer]

    def _layer_dir(self, layer: str) -> Path | None:
        if not self._on_disk():
            return None
        entry = self._entry(layer)
        return self.out / str(entry.get("dir") or entry["name"])  # type: ignore[operator]

    def _arrays(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """(top maps (U, k, h, w), thresholds (U,)) of `layer`, memory-mapped from disk or from memory."""
        d = self._layer_dir(layer)
        if d is None:
            lr = self._layer_result(layer)
            return np.asarray(lr.top_maps), np.asarray(lr.thresholds)
        arrays = []
        for name in ("top_activations.npy", "thresholds.npy"):
            path = d / name
            try:
                arrays.append(np.load(path, mmap_mode="r", allow_pickle=False))
            except (OSError, ValueError) as e:
                raise InputError(f"{path}: cannot read ({e})") from e
        return arrays[0], arrays[1]

    def _label_arrays(self, layer: str) -> np.ndarray | None:
        """label_top_activations.npy (U, k, h, w) of `layer` when the results have it, else None."""
        d = self._layer_dir(layer)
        if d is None or not (d / "label_top_activations.npy").is_file():
            return None
        try:
            return np.load(d / "label_top_activations.npy", mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            return None

    def label_sizes(self) -> tuple[dict[str, tuple[int, int]] | None, str | None]:
        """(image path -> label size (sh, sw) from the dataset's index.csv, or None; why it is None)."""
        if self._sizes is None and self._sizes_error is None:
            from broden.format import load_meta

            root = self.dataset_root
            if root is None:
                self._sizes_error = "summary.json records no dataset root"
            elif not root.is_dir():
                self._sizes_error = f"the dataset directory {root} (summary.json dataset.root) is not there"
            else:
                try:
                    self._sizes = {r.image: (int(r.sh), int(r.sw)) for r in load_meta(root).records}
                except InputError as e:
                    self._sizes_error = f"cannot read the dataset {root}: {e}"
        return self._sizes, self._sizes_error

    # ------------------------------------------------------------------ units

    def unit(self, layer: str, unit: int, thumb_height: int = THUMB_HEIGHT) -> "UnitView":
        """The view of unit `unit` (0-based) of `layer`: label, IoUs, mask fields and top-image strip."""
        units = self.layer_units(layer)["units"]
        if isinstance(unit, bool) or not isinstance(unit, (int, np.integer)):
            raise InputError(f"unit {unit!r}: expected an integer unit index of layer {layer!r}")
        if not 0 <= int(unit) < len(units):
            raise InputError(f"unit {unit} out of range for layer {layer!r}: it has units 0..{len(units) - 1}")
        row = int(unit)
        entry = units[row]
        return UnitView(self, layer, row, entry, thumb_height)

    # ------------------------------------------------------------------ display

    def _layer_bits(self) -> list[str]:
        return [f"{e['name']} ({e.get('num_units')} units, {e.get('detectors')} detectors)"
                for e in self.summary_json.get("layers") or []]

    def __repr__(self) -> str:
        where = f"out={str(self.out)!r}" if self.out is not None else "in memory"
        reused = ", reused" if self.reused else ""
        return f"<Dissection {where}{reused}: {'; '.join(self._layer_bits()) or 'no layers'}>"

    def _title(self) -> str:
        model = self.summary_json.get("model") or {}
        ds = self.summary_json.get("dataset") or {}
        where = str(self.out) if self.out is not None else "(in memory)"
        return (f"Dissection {where}: model {model.get('source', '?')}, {ds.get('num_images', '?')} images "
                f"of {ds.get('root', '?')}, IoU threshold {self.options.get('iou_threshold', '?')}")

    def __str__(self) -> str:
        return f"{self._title()}\n{self.summary.to_string(index=False)}"

    def _repr_html_(self) -> str:
        return (f"<div><p>{html.escape(self._title())}</p>{self.summary.to_html(index=False)}"
                f"<p>r.units: one row per unit; r.unit(layer, u): a unit's labels and top images</p></div>")


class UnitView:
    """One unit: its units.json entry and, drawn on demand, its top images with the thresholded mask."""

    def __init__(self, dissection: Dissection, layer: str, row: int, entry: dict[str, Any],
                 thumb_height: int = THUMB_HEIGHT) -> None:
        self.dissection = dissection
        self.layer = layer
        self.row = row
        self.entry = entry
        self.thumb_height = int(thumb_height)

    @property
    def unit(self) -> int:
        """The unit's index in its layer."""
        return int(self.entry["unit"])

    @property
    def label(self) -> str:
        """The unit's top label (units.json 'label')."""
        return str(self.entry["label"])

    @property
    def category(self) -> str | None:
        """The category of the top label."""
        return self.entry.get("category")

    @property
    def iou(self) -> float:
        """The top label's IoU."""
        return float(self.entry["iou"])

    @property
    def threshold(self) -> float:
        """The activation threshold T_k of the unit."""
        return float(self.entry["threshold"])

    @property
    def top_images(self) -> list[dict[str, Any]]:
        """units.json 'top_images': [{'index', 'image', 'max_activation'}], best first."""
        return list(self.entry.get("top_images") or [])

    def strip(self) -> tuple[Any, str | None]:
        """(PIL image of the top-image strip, or None; a note on what could not be shown, or None)."""
        maps, thresholds = self.dissection._arrays(self.layer)
        return self._draw(self.top_images, maps, thresholds)

    def label_strip(self) -> tuple[Any, str | None] | None:
        """The strip of the images ranked by intersection with the label, when the results have one."""
        images = self.entry.get("label_top_images")
        if not images:
            return None
        maps = self.dissection._label_arrays(self.layer)
        if maps is None:
            return None
        _, thresholds = self.dissection._arrays(self.layer)
        return self._draw(list(images), maps, thresholds)

    def _draw(self, images: list[dict[str, Any]], maps: np.ndarray, thresholds: np.ndarray) -> tuple[Any, str | None]:
        """The strip of `images` (units.json entries) with this unit's maps from `maps` (U, k, h, w)."""
        import torch

        from dissect.strips import activation_masks, compose_tiles, load_rgb, strip_image

        if not images:
            return None, "no top images recorded for this unit"
        if maps.ndim != 4 or self.row >= maps.shape[0]:
            return None, f"the layer's top-activation maps have shape {tuple(maps.shape)}, expected (units, k, h, w)"
        images = images[: maps.shape[1]]  # units.json may list more images than maps were kept for
        sizes, why = self.dissection.label_sizes()
        if sizes is None:
            return None, f"top images not shown: {why}"
        root = self.dissection.dataset_root
        assert root is not None  # label_sizes found it
        threshold = torch.tensor([float(thresholds[self.row])], dtype=torch.float32)
        placeholder = np.full((self.thumb_height, self.thumb_height, 3), _PLACEHOLDER_GREY, dtype=np.uint8)
        tiles, unread = [], []
        for j, item in enumerate(images):
            path = str(item["image"])
            rgb = load_rgb(root / "images" / path) if path in sizes else None
            if rgb is None:
                unread.append(path)
                tiles.append(placeholder)
                continue
            amap = torch.from_numpy(np.array(maps[self.row, j], dtype=np.float32))[None]  # (1, h, w)
            mask = activation_masks(amap, threshold, sizes[path])  # (1, sh, sw)
            image = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None]  # (1, 3, H, W), a writable copy
            tiles.append(compose_tiles(image, mask, self.thumb_height)[0])
        if len(unread) == len(images):
            return None, f"top images not shown: none of the {len(images)} could be read under {root / 'images'}"
        note = (f"{len(unread)} of {len(images)} images could not be read (grey tiles), e.g. {unread[0]}"
                if unread else None)
        return strip_image(tiles), note

    def __repr__(self) -> str:
        return (f"<UnitView {self.layer} unit {self.unit}: {self.label!r} ({self.category}), IoU {self.iou:.4f}, "
                f"threshold {self.threshold:.4g}, {len(self.top_images)} top images>")

    def _repr_html_(self) -> str:
        e = self.entry
        esc = html.escape
        rows = [("label", f"{e['label']} ({e.get('category')})"), ("IoU", f"{self.iou:.4f}"),
                ("threshold", f"{self.threshold:.6g}")]
        if e.get("group") is not None:
            rows.append(("group", str(e["group"])))
        for key in ("mask_components", "mask_spread"):
            if e.get(key) is not None:
                rows.append((key.replace("_", " "), f"{float(e[key]):.3f}"))
        head = "".join(f"<tr><th style='text-align:left'>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
        per_cat = "".join(
            f"<tr><td>{esc(str(c))}</td><td>{esc(str(pc.get('label')))}</td><td>{float(pc.get('iou', 0.0)):.4f}</td></tr>"
            for c, pc in (e.get("per_category") or {}).items())
        parts = [f"<div class='dissect-unit'><h4>{esc(self.layer)} unit {self.unit}</h4>",
                 f"<table>{head}</table>",
                 f"<table><tr><th>category</th><th>label</th><th>IoU</th></tr>{per_cat}</table>"]
        strip, note = self.strip()
        parts.append(_figure(strip, f"top {len(self.top_images)} images by maximum activation", note))
        label = self.label_strip()
        if label is not None:
            parts.append(_figure(label[0], f"ranked by intersection with {e['label']}", label[1]))
        parts.append("</div>")
        return "".join(parts)


def _figure(image: Any, title: str, note: str | None) -> str:
    """An embedded JPEG (base64 data URI) with its title, or the note saying why there is none."""
    esc = html.escape
    note_html = f"<p><em>{esc(note)}</em></p>" if note else ""
    if image is None:
        return f"<p>{esc(title)}</p>{note_html}"
    buf = io.BytesIO()
    # 4:4:4 chroma keeps the thin mask outline sharp, as in the report's strips
    image.save(buf, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (f"<figure><figcaption>{esc(title)}</figcaption>"
            f"<img src='data:image/jpeg;base64,{data}' width='{image.width}' height='{image.height}' "
            f"alt='{esc(title)}'></figure>{note_html}")
