"""The CGL paper's synthetic shapes dataset (section 4.1), written in Broden format.

Each image: white background, exactly two filled shapes (square, circle or
triangle), each pure red, green or blue; one shape lies in the top half, one in
the bottom half (which one is random), at a random position inside its half,
kept `MARGIN` px away from the half's edges so the two never touch.

Each shape is ONE continuous geometry (a d x d box at integer corner (y0, x0)
and an inside-test) sampled twice: at the image pixel centres (y + 0.5) to
paint the image, and at the half-size label pixel centres (image coordinates
2v + 1, the corner shared by the 2x2 image pixels it covers) to make the label
maps. This keeps squares exact rectangles in the label maps and label areas
unbiased (label pixels ~ image pixels / 4); a label pixel on a shape's
boundary may cover as few as 1 of its 4 image pixels (majority over 2x2 blocks
was rejected: with the odd 13 px side it cuts a corner off every square).
The size is a multiple of 4 so no 2x2 block straddles the two halves.

Label ids (fixed): 1 red, 2 green, 3 blue (color); 4 square, 5 circle,
6 triangle (shape); 7..15 color_shape in colour-major order
(red_square, red_circle, red_triangle, green_square, ..., blue_triangle).

Classes: the 9 coloured shapes are indexed k = 3*colour + shape; class45 numbers
the unordered pairs (i <= j) in lexicographic order (0 = red_square+red_square,
44 = blue_triangle+blue_triangle); `binary` = 1 when a square is present.
The train/val split is stratified by class45: each class gets
floor(per_class * val_fraction) val images, and the remaining val images (to
reach round(N * val_fraction)) go one each to randomly chosen classes.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from broden.errors import InputError
from broden.writer import BrodenWriter
from broden._progress import progress as _progress

__all__ = ["GENERATOR_VERSION", "CATEGORIES", "COLORS", "SHAPES", "COLOR_RGB", "LABELS", "MARGIN",
           "CLASS_PAIRS", "CLASS_NAMES", "CLASSES_COLUMNS", "default_shape_size", "shape_masks",
           "image_centres", "label_centres", "generate_shapes_dataset", "load_classes", "summarize",
           "DEFAULT_PER_CLASS", "DEFAULT_SIZE", "DEFAULT_SEED", "DEFAULT_VAL_FRACTION", "synthetic_dir"]

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
FORMAT = "cgl-synthetic-shapes"
CATEGORIES = ("color", "shape", "color_shape")
COLORS = ("red", "green", "blue")
SHAPES = ("square", "circle", "triangle")
COLOR_RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
BACKGROUND = (255, 255, 255)
MARGIN = 1          # px between a shape and the edges of its half
SOURCE = "shapes"   # images/<SOURCE>/...
CLASSES_COLUMNS = ("image", "split", "class45", "class45_name", "binary")
# The paper's parameters (45 * 640 = 28,800 images of 64 px, 80/20 split): one default for every CLI.
DEFAULT_PER_CLASS = 640
DEFAULT_SIZE = 64
DEFAULT_SEED = 0
DEFAULT_VAL_FRACTION = 0.2
_CHUNK = 256        # images rasterised at once (bounds the float64 temporaries)

COLORED_SHAPES = tuple(f"{c}_{s}" for c in COLORS for s in SHAPES)  # index k = 3*colour + shape
# (id, name, category) in id order
LABELS: tuple[tuple[int, str, str], ...] = (
    tuple((1 + i, c, "color") for i, c in enumerate(COLORS))
    + tuple((4 + i, s, "shape") for i, s in enumerate(SHAPES))
    + tuple((7 + k, n, "color_shape") for k, n in enumerate(COLORED_SHAPES)))
CLASS_PAIRS: tuple[tuple[int, int], ...] = tuple((i, j) for i in range(9) for j in range(i, 9))
CLASS_NAMES: tuple[str, ...] = tuple(f"{COLORED_SHAPES[i]}+{COLORED_SHAPES[j]}" for i, j in CLASS_PAIRS)


def default_shape_size(size: int) -> int:
    """The paper's ~13 px at 64 px, scaled with the image size (rounded half up)."""
    return int(math.floor(13 * size / 64 + 0.5))


def shape_masks(kind: np.ndarray, y0: np.ndarray, x0: np.ndarray, d: int, centres: np.ndarray) -> np.ndarray:
    """Inside-test of M shapes at a square grid of sample points: (M, G, G) bool.

    kind: (M,) index into SHAPES; (y0, x0): (M,) top-left corner of each shape's
    d x d box in image coordinates (pixel y spans [y, y+1)); centres: (G,) sample
    coordinates along each axis. Square: the box. Circle: the inscribed disc.
    Triangle: apex at the top centre, base along the bottom edge of the box.
    """
    c = np.asarray(centres, dtype=np.float64)
    py = c[None, :, None] - y0[:, None, None].astype(np.float64)   # (M, G, 1) offset from the box top
    px = c[None, None, :] - x0[:, None, None].astype(np.float64)   # (M, 1, G)
    r = d / 2
    in_y, in_x = (py >= 0) & (py < d), (px >= 0) & (px < d)
    square = in_y & in_x
    circle = (py - r) ** 2 + (px - r) ** 2 <= r * r
    triangle = in_y & (np.abs(px - r) <= py / 2)
    k = kind[:, None, None]
    return np.where(k == 0, square, np.where(k == 1, circle, triangle))  # (M, G, G)


def image_centres(size: int) -> np.ndarray:
    """Centres of the image pixels: (size,) = 0.5, 1.5, ..."""
    return np.arange(size, dtype=np.float64) + 0.5


def label_centres(size: int) -> np.ndarray:
    """Centres of the half-size label pixels in image coordinates: (size/2,) = 1, 3, 5, ..."""
    return 2 * np.arange(size // 2, dtype=np.float64) + 1


def _validate(per_class: int, size: int, seed: int, val_fraction: float, shape_size: int | None) -> int:
    """Check every parameter; return the shape size (the scaled default when None)."""
    def is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)
    if not is_int(per_class) or per_class < 1:
        raise InputError(f"--per-class must be a positive integer, got {per_class!r}")
    if not is_int(size) or size < 16 or size % 4:
        raise InputError(f"--size must be a multiple of 4 and at least 16 (label maps are size/2 and no "
                         f"2x2 label block may straddle the two halves), got {size!r}")
    if not is_int(seed) or seed < 0:
        raise InputError(f"--seed must be a non-negative integer, got {seed!r}")
    if not isinstance(val_fraction, (int, float)) or not (0.0 <= float(val_fraction) < 1.0):
        raise InputError(f"--val-fraction must lie in [0, 1), got {val_fraction!r}")
    shape_size = default_shape_size(size) if shape_size is None else shape_size
    largest = size // 2 - 2 * MARGIN
    if not is_int(shape_size) or not (5 <= shape_size <= largest):
        raise InputError(f"shape size {shape_size} px (--shape-size, default 13*size/64) must lie in "
                         f"5..{largest} for --size {size}: smaller shapes vanish from the half-size "
                         "label maps, larger ones do not fit in half the image")
    return int(shape_size)


def _split(cls: np.ndarray, per_class: int, val_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Stratified split: (N,) array of 'train'/'val' (see the module docstring)."""
    n_cls = len(CLASS_PAIRS)
    base = math.floor(per_class * val_fraction)
    extra = round(len(cls) * val_fraction) - n_cls * base
    n_val = np.full(n_cls, base, dtype=np.int64)
    n_val[rng.choice(n_cls, size=extra, replace=False)] += 1
    split = np.full(len(cls), "train", dtype=object)
    for c in range(n_cls):  # 45 classes, not images
        members = np.flatnonzero(cls == c)
        split[rng.choice(members, size=int(n_val[c]), replace=False)] = "val"
    return split


def _parameters(per_class: int, size: int, seed: int, val_fraction: float, shape_size: int) -> dict:
    return {"per_class": int(per_class), "size": int(size), "seed": int(seed),
            "val_fraction": float(val_fraction), "shape_size": int(shape_size)}


def _existing_generation(out: Path) -> dict | None:
    """synthetic.json of a complete generation in `out`, or None."""
    try:
        meta = json.loads((out / "synthetic.json").read_text())
    except (OSError, ValueError):
        return None
    complete = all((out / f).is_file() for f in ("index.csv", "classes.csv", "label.csv"))
    return meta if complete and isinstance(meta, dict) else None


def synthetic_dir(cache_dir: str | Path | None = None, per_class: int = DEFAULT_PER_CLASS,
                  size: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED,
                  val_fraction: float = DEFAULT_VAL_FRACTION) -> Path:
    """The one cache location of a generated set: <cache>/synthetic/shapes-pc<N>-s<S>-seed<K>-val<F>.

    `cache_dir` None means broden.cache.default_cache_dir() ($DISSECT_CACHE_DIR, else
    ~/.cache/concept-dissect); `dissect run --dataset synthetic` and `cgl-train --data synthetic`
    both resolve here, so a model is dissected on the very files it was trained on.
    """
    from broden.cache import default_cache_dir  # late: keeps this module's import light

    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / "synthetic" / f"shapes-pc{int(per_class)}-s{int(size)}-seed{int(seed)}-val{float(val_fraction):g}"


def generate_shapes_dataset(out: Path, per_class: int = DEFAULT_PER_CLASS, size: int = DEFAULT_SIZE,
                            seed: int = DEFAULT_SEED, val_fraction: float = DEFAULT_VAL_FRACTION,
                            progress: bool = True, shape_size: int | None = None,
                            option: str = "--out") -> Path:
    """Write the synthetic shapes dataset as a complete Broden directory at `out` and return it.

    Deterministic for given arguments (byte-identical files). Written to a
    temporary directory beside `out`, then renamed into place. An existing
    non-empty `out` is reused only if it holds a complete generation with the
    same parameters; otherwise InputError, naming `option` (the flag the user gave for `out`,
    e.g. '--synthetic-dir' for cgl-train).
    """
    shape_size = _validate(per_class, size, seed, val_fraction, shape_size)
    params = _parameters(per_class, size, seed, val_fraction, shape_size)
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{option} {out} exists and is not a directory")
        if any(out.iterdir()):
            meta = _existing_generation(out)
            if (meta and meta.get("format") == FORMAT and meta.get("generator_version") == GENERATOR_VERSION
                    and meta.get("parameters") == params):
                log.info("reusing the identical generation in %s", out)
                return out
            raise InputError(f"{option} {out} is not empty and does not hold a complete generation with these "
                             f"parameters {params}; pick another directory or delete it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write(tmp, params, progress)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write(root: Path, params: dict, show_progress: bool) -> None:
    per_class, size, seed, d = params["per_class"], params["size"], params["seed"], params["shape_size"]
    rng = np.random.default_rng(seed)
    n_cls = len(CLASS_PAIRS)
    n = n_cls * per_class
    half = size // 2

    # every random draw up front, in a fixed order, so the output depends only on the parameters
    cls = rng.permutation(np.repeat(np.arange(n_cls, dtype=np.int64), per_class))   # (N,)
    pairs = np.asarray(CLASS_PAIRS, dtype=np.int64)[cls]                             # (N, 2) coloured-shape k
    swap = rng.integers(0, 2, size=n).astype(bool)
    slots = np.where(swap[:, None], pairs[:, ::-1], pairs)                           # (N, 2): top, bottom
    lo_y = np.array([MARGIN, half + MARGIN])                                         # per slot
    span = half - 2 * MARGIN - d + 1                                                 # positions per axis
    y0 = lo_y[None, :] + rng.integers(0, span, size=(n, 2))                          # (N, 2)
    x0 = MARGIN + rng.integers(0, size - 2 * MARGIN - d + 1, size=(n, 2))            # (N, 2)
    split = _split(cls, per_class, params["val_fraction"], rng)

    rgb = np.array([COLOR_RGB[c] for c in COLORS], dtype=np.uint8)                   # (3, 3)
    writer = BrodenWriter(root, list(CATEGORIES))
    for number, name, _ in LABELS:
        writer.add_label(number, name)
    pixels = np.zeros(len(LABELS) + 1, dtype=np.int64)                               # by label id
    width = max(5, len(str(n - 1)))
    rows: list[tuple[str, str, int, str, int]] = []
    bar_options: dict[str, Any] = {} if show_progress else {"disable": True}
    bar = _progress(total=n, desc="synth", unit="img", **bar_options)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        k = slots[start:stop]                                                        # (B, 2)
        colour, shape = k // 3, k % 3
        geometry = (shape.ravel(), y0[start:stop].ravel(), x0[start:stop].ravel(), d)
        masks = shape_masks(*geometry, image_centres(size)).reshape(stop - start, 2, size, size)
        small = shape_masks(*geometry, label_centres(size)).reshape(stop - start, 2, half, half)
        if not small.any(axis=(2, 3)).all():
            raise InputError(f"a shape of {d} px vanished from the label maps; use a larger --shape-size")
        images = np.empty((stop - start, size, size, 3), dtype=np.uint8)
        images[:] = np.array(BACKGROUND, dtype=np.uint8)
        for slot in range(2):  # the halves do not overlap: paint each slot's pixels in turn
            m = masks[:, slot]                                                       # (B, S, S)
            images[m] = rgb[np.broadcast_to(colour[:, slot, None, None], m.shape)[m]]
        # label maps: each slot's ids where its half-size mask is set (slots never share a pixel)
        ids = {"color": 1 + colour, "shape": 4 + shape, "color_shape": 7 + k}
        layers = {cat: (small * v[:, :, None, None]).sum(axis=1, dtype=np.int64)    # (B, S/2, S/2)
                  for cat, v in ids.items()}
        for cat in CATEGORIES:
            pixels += np.bincount(layers[cat].ravel(), minlength=len(pixels))
        for b in range(stop - start):  # one PNG set per image: file I/O, not pixel work
            i = start + b
            rel = writer.add_image(f"shape_{i:0{width}d}", images[b], split=str(split[i]),
                                   layers={cat: [layers[cat][b]] for cat in CATEGORIES}, source=SOURCE)
            c = int(cls[i])
            rows.append((rel, str(split[i]), c, CLASS_NAMES[c], int((pairs[i] % 3 == 0).any())))
        bar.update(stop - start)
    bar.close()
    writer.close()

    with open(root / "classes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CLASSES_COLUMNS)
        w.writerows(rows)
    n_val = int((split == "val").sum())
    meta = {
        "format": FORMAT,
        "generator_version": GENERATOR_VERSION,
        "parameters": params,
        "geometry": {
            "margin": MARGIN, "label_size": half, "background": list(BACKGROUND),
            "colors": {c: list(COLOR_RGB[c]) for c in COLORS},
            "label_rule": "inside-test at label pixel centres (image coordinates 2v+1, 2u+1)",
            "shapes": "square: d x d box; circle: inscribed disc; triangle: apex top centre, base at the bottom",
        },
        "categories": list(CATEGORIES),
        "labels": [{"id": i, "name": nm, "category": cat} for i, nm, cat in LABELS],
        "classes": list(CLASS_NAMES),
        "binary": "1 if a square is present, else 0",
        "split": "stratified by class45; round(N * val_fraction) val images",
        "num_images": {"total": n, "train": n - n_val, "val": n_val},
        "label_pixels": {nm: int(pixels[i]) for i, nm, _ in LABELS},
        "files": {"index": "index.csv", "classes": "classes.csv"},
    }
    (root / "synthetic.json").write_text(json.dumps(meta, indent=1) + "\n")


def _bad(path: Path, msg: str) -> InputError:
    return InputError(f"{path}: {msg}")


def load_classes(root: str | Path) -> "pd.DataFrame":
    """Read `root/classes.csv` (columns CLASSES_COLUMNS), validated against the class table and index.csv."""
    import pandas as pd  # late: pandas is slow to import and only readers need it

    root = Path(root)
    path = root / "classes.csv"
    if not path.is_file():
        raise _bad(path, "not found; expected the classes.csv written by `dissect synth`")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as e:
        raise _bad(path, f"cannot parse as CSV ({e})") from None
    if tuple(df.columns) != CLASSES_COLUMNS:
        raise _bad(path, f"columns are {list(df.columns)}; expected {list(CLASSES_COLUMNS)}")
    for col in ("class45", "binary"):
        bad = ~df[col].str.fullmatch(r"\d+")
        if bad.any():
            line = int(np.flatnonzero(bad.to_numpy())[0]) + 2
            raise _bad(path, f"line {line}: column {col!r} must be a non-negative integer, "
                             f"got {df[col][bad].iloc[0]!r}")
        df[col] = df[col].astype(np.int64)
    checks = [
        ("split", ~df["split"].isin(["train", "val"]), "must be 'train' or 'val'"),
        ("class45", ~df["class45"].between(0, len(CLASS_NAMES) - 1), f"must lie in 0..{len(CLASS_NAMES) - 1}"),
        ("binary", ~df["binary"].isin([0, 1]), "must be 0 or 1"),
    ]
    for col, bad, what in checks:
        if bad.any():
            line = int(np.flatnonzero(bad.to_numpy())[0]) + 2
            raise _bad(path, f"line {line}: column {col!r} {what}, got {df[col][bad].iloc[0]!r}")
    names = np.asarray(CLASS_NAMES, dtype=object)[df["class45"].to_numpy()]
    has_square = np.array([any(p.endswith("_square") for p in nm.split("+")) for nm in names], dtype=np.int64)
    for col, want in (("class45_name", names), ("binary", has_square)):
        bad = df[col].to_numpy() != want
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise _bad(path, f"line {i + 2}: column {col!r} is {df[col].iloc[i]!r} but class45 "
                             f"{df['class45'].iloc[i]} means {want[i]!r}")
    index = root / "index.csv"
    if index.is_file():
        idx = pd.read_csv(index, dtype=str, keep_default_na=False, usecols=["image", "split"])
        if len(idx) != len(df) or not (idx["image"].to_numpy() == df["image"].to_numpy()).all():
            raise _bad(path, f"images differ from {index} (same rows in the same order expected)")
        bad = idx["split"].to_numpy() != df["split"].to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise _bad(path, f"line {i + 2}: split {df['split'].iloc[i]!r} differs from {index} "
                             f"({idx['split'].iloc[i]!r})")
    return df


def summarize(root: str | Path) -> dict[str, Any]:
    """Counts for a generated dataset: images per split, per class setting, label pixels per concept."""
    root = Path(root)
    df = load_classes(root)
    try:
        meta = json.loads((root / "synthetic.json").read_text())
    except (OSError, ValueError) as e:
        raise _bad(root / "synthetic.json", f"unreadable ({e})") from None
    return {
        "root": str(root),
        "parameters": meta.get("parameters", {}),
        "images": {s: int((df["split"] == s).sum()) for s in ("train", "val")},
        "classes45": int(df["class45"].nunique()),
        "binary": {str(b): int((df["binary"] == b).sum()) for b in (0, 1)},
        "label_pixels": meta.get("label_pixels", {}),
        "files": {"index": str(root / "index.csv"), "classes": str(root / "classes.csv"),
                  "images": str(root / "images" / SOURCE), "metadata": str(root / "synthetic.json")},
    }
