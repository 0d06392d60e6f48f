"""Per-unit strips of top images with the thresholded activation mask drawn over them.

The drawing primitives live in dissect.strips (notebooks use them too). The
mask is the dissection's own: the unit's saved map upsampled bilinearly to the
image's LABEL size (sh x sw, from the dataset's index.csv) and compared
strictly with the unit's threshold, then scaled to the thumbnail
nearest-neighbour, so a pixel shown as active is one the IoU counted. Upsampling the map to the image size instead would disagree with
the tally: a 2x bilinear upscale lowers a single-pixel peak, so a unit that
passes the detector rule could show an empty mask (and the other way round).
The image is resized to the thumbnail, pixels outside the mask are dimmed and
the mask outline is drawn. Each strip is written once under report/thumbs/<layer>/;
its file name carries a hash of everything that shapes it, so an unchanged
strip is reused and a stale one replaced.
"""
from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from broden.errors import InputError
from broden._fileio import atomic_path
from dissect.strips import OUTLINE_COLOR, activation_masks, compose_tiles, load_rgb, scale_masks, strip_image  # noqa: F401 (re-exported)
from reports.results import LayerResults, safe_name


__all__ = ["activation_masks", "scale_masks", "compose_tiles", "label_sizes", "unit_strips", "OUTLINE_COLOR",
           "STRIP_KINDS"]

log = logging.getLogger(__name__)

_PLACEHOLDER_GREY = 160
_UNITS_PER_CHUNK = 32  # units whose images are decoded and composed together


def _stat_key(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def label_sizes(dataset_root: str | Path) -> dict[str, tuple[int, int]]:
    """Image path (relative to images/) -> its label size (sh, sw), from the dataset's index.csv."""
    from broden.format import load_meta

    return {r.image: (int(r.sh), int(r.sw)) for r in load_meta(dataset_root).records}


# (units.json list, maps file, file-name prefix) of each kind of strip
STRIP_KINDS = {"peak": ("top_images", "top_activations.npy", "unit"),
               "label": ("label_top_images", "label_top_activations.npy", "label")}


def unit_strips(layer: "LayerResults", dataset_root: str | Path, out_dir: str | Path, top_k: int,
                thumb_height: int = 112, dim: float = 0.2, quality: int = 85,
                sizes: Mapping[str, tuple[int, int]] | None = None, kind: str = "peak") -> dict[int, str | None]:
    """Write (or reuse) one JPEG strip per unit under out_dir/thumbs/<layer>/.

    `kind` "peak": the top images by peak activation (units.json top_images, top_activations.npy);
    "label": the images ranked by intersection with the unit's label (label_top_images,
    label_top_activations.npy; a run without them gives no strips).
    `sizes` maps each image path to its label size (default: read with `label_sizes`).
    Returns unit -> strip path relative to out_dir (None for a unit with no such images).
    A missing image, or one the dataset's index no longer lists, becomes a grey tile and is logged.
    """
    if kind not in STRIP_KINDS:
        raise InputError(f"strip kind {kind!r}: expected one of {', '.join(STRIP_KINDS)}")
    list_key, maps_file, prefix = STRIP_KINDS[kind]
    units: list[dict[str, Any]] = layer.units["units"]
    U = len(units)
    if kind == "label" and not (layer.dir / maps_file).is_file():
        return {int(u["unit"]): None for u in units}  # --label-strips off, or a run from before it
    acts = layer.array(maps_file, (U,))  # (U, k, h, w)
    thresholds = layer.array("thresholds.npy", (U,))  # (U,)
    if acts.ndim != 4:
        raise InputError(f"{layer.dir / maps_file}: shape {acts.shape}, expected (units, k, h, w)")
    top_k = min(top_k, acts.shape[1])  # units.json may list fewer images than maps were kept for
    images_dir = Path(dataset_root) / "images"
    thumbs = Path(out_dir) / "thumbs" / safe_name(layer.name)
    thumbs.mkdir(parents=True, exist_ok=True)
    if sizes is None:
        sizes = label_sizes(dataset_root)
    params = f"k={top_k};h={thumb_height};dim={dim!r};q={quality};outline={OUTLINE_COLOR};mask=label-size"

    result: dict[int, str | None] = {}
    todo: list[tuple[int, int, str, list[str]]] = []  # (row, unit, file name, image paths)
    for row, u in enumerate(units):
        unit = int(u["unit"])
        paths = [str(t["image"]) for t in (u.get(list_key) or [])[:top_k]]
        if not paths:
            result[unit] = None
            continue
        h = hashlib.sha1(params.encode())
        h.update(np.ascontiguousarray(acts[row, : len(paths)]).tobytes())
        h.update(np.float32(thresholds[row]).tobytes())
        for p in paths:
            h.update(f"|{p}|{_stat_key(images_dir / p)}|{sizes.get(p)}".encode())
        name = f"{prefix}{unit:04d}-{h.hexdigest()[:12]}.jpg"
        result[unit] = (thumbs / name).relative_to(out_dir).as_posix()
        if not (thumbs / name).is_file():
            todo.append((row, unit, name, paths))
    _remove_stale(thumbs, prefix, {Path(p).name for p in result.values() if p})
    if not todo:
        return result

    for first in range(0, len(todo), _UNITS_PER_CHUNK):  # bounds memory on layers with many units
        _write_strips(todo[first: first + _UNITS_PER_CHUNK], acts, thresholds, images_dir, sizes, thumbs,
                      thumb_height, dim, quality)
    log.info("%s: wrote %d %s strips, reused %d", layer.name, len(todo), kind, len(result) - len(todo))
    return result


def _write_strips(todo: Sequence[tuple[int, int, str, list[str]]], acts: np.ndarray, thresholds: np.ndarray,
                  images_dir: Path, sizes: Mapping[str, tuple[int, int]], thumbs: Path, thumb_height: int,
                  dim: float, quality: int) -> None:
    """Draw and save the strips of `todo` = [(row in units.json, unit, file name, image paths)]."""
    # Each needed image is read once, then maps are thresholded in one batch per (image, label) size.
    needed = {p for *_, paths in todo for p in paths}
    unlisted = sorted(p for p in needed if p not in sizes)
    if unlisted:
        log.warning("%d top image(s) not in the dataset's index.csv (e.g. %s): shown as grey tiles",
                    len(unlisted), unlisted[0])
    cache = {p: load_rgb(images_dir / p) if p in sizes else None for p in needed}
    by_size: dict[tuple[tuple[int, int], tuple[int, int]], list[tuple[int, int]]] = defaultdict(list)
    for i, (_, _, _, paths) in enumerate(todo):
        for j, p in enumerate(paths):
            if cache[p] is not None:
                by_size[(cache[p].shape[:2], sizes[p])].append((i, j))  # (todo idx, j)
    tiles: dict[tuple[int, int], np.ndarray] = {}
    for (_, label_size), pairs in by_size.items():
        rows = np.array([todo[i][0] for i, _ in pairs])
        cols = np.array([j for _, j in pairs])
        maps = torch.from_numpy(acts[rows, cols].astype(np.float32))  # (n, h, w)
        masks = activation_masks(maps, torch.from_numpy(thresholds[rows].astype(np.float32)),
                                 label_size)  # (n, sh, sw)
        imgs = torch.from_numpy(np.stack([cache[todo[i][3][j]] for i, j in pairs])).permute(0, 3, 1, 2)
        for (i, j), tile in zip(pairs, compose_tiles(imgs, masks, thumb_height, dim)):
            tiles[(i, j)] = tile

    placeholder = np.full((thumb_height, thumb_height, 3), _PLACEHOLDER_GREY, dtype=np.uint8)
    for i, (_, unit, name, paths) in enumerate(todo):
        strip = strip_image([tiles.get((i, j), placeholder) for j in range(len(paths))])
        with atomic_path(thumbs / name) as tmp:
            # 4:4:4 chroma keeps the thin mask outline from bleeding into its neighbours
            strip.save(tmp, format="JPEG", quality=quality, optimize=True, subsampling=0)


def _remove_stale(thumbs: Path, prefix: str, keep: set[str]) -> None:
    for path in thumbs.glob(f"{prefix}[0-9]*.jpg"):
        if path.name not in keep:
            path.unlink(missing_ok=True)
