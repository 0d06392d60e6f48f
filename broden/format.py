"""Parse a Broden-format directory: the CSV tables and the label-PNG encoding.

Pure reading, no side effects. The format is described in
shared/design/netdissect.md, section 1. Every format error raises
BrodenFormatError naming the file and, for CSV rows, the 1-based line number.
"""
from __future__ import annotations

import csv
import io
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NoReturn

import numpy as np
from PIL import Image

from broden.errors import BrodenFormatError

__all__ = [
    "INDEX_FIXED_COLUMNS",
    "LabelInfo",
    "ImageRecord",
    "BrodenMeta",
    "decode_label_png",
    "decode_image",
    "decode_record_image",
    "load_meta",
    "validate",
    "check_label_plane",
    "check_uniform_sizes",
    "known_id_table",
]

INDEX_FIXED_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw")
_INT_RE = re.compile(r"^[+-]?\d+$")


@dataclass(frozen=True)
class LabelInfo:
    """One label of label.csv: global id, name, primary category and coverage per category."""

    id: int
    name: str
    category: str | None  # primary category; None when no c_<cat>.csv lists the label
    coverage: dict[str, float] = field(default_factory=dict)


@dataclass
class ImageRecord:
    """One row of index.csv; paths are relative to `<root>/images/`."""

    index: int  # 0-based row over the whole index
    line: int  # 1-based line of index.csv, for error messages
    image: str
    split: str
    ih: int
    iw: int
    sh: int
    sw: int
    layers: dict[str, list[str]]  # category -> PNG relpaths, in cell order
    image_labels: dict[str, list[int]]  # category -> image-level label ids, in cell order


@dataclass
class BrodenMeta:
    """Everything the CSVs of a Broden directory say."""

    root: Path
    categories: list[str]
    labels: dict[int, LabelInfo]
    label_names: list[str]  # indexed by id; '-' at 0, '' for ids label.csv lacks
    label_category: np.ndarray  # (num_labels,) int64: index into categories, -1 for 0/unused
    records: list[ImageRecord]

    @property
    def num_labels(self) -> int:
        """Largest label id + 1 (ids index arrays directly)."""
        return len(self.label_names)

    @property
    def num_images(self) -> int:
        """Number of rows of index.csv."""
        return len(self.records)

    def category_index(self, category: str) -> int:
        """Position of `category` in category.csv order."""
        try:
            return self.categories.index(category)
        except ValueError:
            raise BrodenFormatError(
                f"{self.root / 'category.csv'}: no category {category!r}; "
                f"categories are {self.categories}") from None

    def category_labels(self, category: str) -> list[int]:
        """Ids (ascending) of the labels whose primary category is `category`."""
        c = self.category_index(category)
        return np.flatnonzero(self.label_category == c).tolist()

    def primary_categories(self, selected: Iterable[str] | None = None) -> np.ndarray:
        """(num_labels,) int64 primary category of every id among the `selected` categories only.

        Values index `self.categories` (-1: id 0, or no selected category lists the label).
        NetDissect-Lite computes primaries over the categories it was asked for, so a label
        listed in object and in an unselected material belongs to object even when material
        covers more of it; with every category selected this is `label_category`.
        """
        if selected is None:
            return self.label_category
        keep = [self.category_index(c) for c in selected]
        cov = np.full((self.num_labels, len(self.categories)), -np.inf)  # (L, C): -inf = not listed
        for info in self.labels.values():  # once per dataset, a few thousand labels
            for c, value in info.coverage.items():
                cov[info.id, self.categories.index(c)] = value
        mask = np.full(len(self.categories), False)
        mask[keep] = True
        cov[:, ~mask] = -np.inf
        # the largest coverage, ties to the later category: argmax over the reversed columns
        best = len(self.categories) - 1 - cov[:, ::-1].argmax(axis=1)
        out = np.where(np.isfinite(cov.max(axis=1)), best, -1).astype(np.int64)
        out[0] = -1
        return out

    def image_path(self, record: ImageRecord) -> Path:
        """Absolute path of a record's image."""
        return self.root / "images" / record.image

    def png_path(self, relpath: str) -> Path:
        """Absolute path of a label PNG given relative to images/."""
        return self.root / "images" / relpath


# Readers that give mode 'I' only for samples on a 16-bit scale: PNG (16-bit gray, Pillow < 10) and
# PPM/PGM (maxval > 255, which Pillow rescales to 0..65535). Elsewhere 'I' is 32-bit of unknown range.
_SIXTEEN_BIT_I_FORMATS = ("PNG", "PPM")
# The raw modes of 8-bit label PNGs: id = R + 256*G needs full 8-bit channels, nothing rescaled
_LABEL_PNG_RAWMODES = ("RGB", "RGBA", "L")


def _rawmode(img: Image.Image) -> str | None:
    """The decoder's raw mode of an opened image, read before load() (which drops the tile)."""
    tile = getattr(img, "tile", None)
    if not tile:
        return None
    args = tile[0][3]  # (codec, extents, offset, args); args is the raw mode or starts with it
    if isinstance(args, tuple):
        args = args[0] if args else None
    return args if isinstance(args, str) else None


def decode_label_png(path: str | Path) -> np.ndarray:
    """Decode a Broden label PNG into an int32 (h, w) array of global ids (R + 256*G).

    The PNG must hold 8-bit samples (RGB, RGBA, or L read as the id itself): a
    16-bit or low-bit-depth PNG would be rescaled by Pillow into wrong ids, so it is refused.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            rawmode = _rawmode(img) if img.format == "PNG" else None
            if rawmode is not None and rawmode not in _LABEL_PNG_RAWMODES:
                raise BrodenFormatError(
                    f"{path}: label PNG stores {rawmode!r} samples ({_depth_words(rawmode)}); expected an "
                    f"8-bit RGB(A) PNG (id = R + 256*G)")
            img.load()
            mode = img.mode
            arr = np.asarray(img)
    except FileNotFoundError:
        raise BrodenFormatError(f"{path}: label PNG not found") from None
    except OSError as e:
        raise BrodenFormatError(f"{path}: cannot decode label PNG ({e})") from None
    if mode in ("RGB", "RGBA"):
        # int32 before the arithmetic: uint8 would wrap (numpy >= 2 raises)
        return arr[..., 0].astype(np.int32) + 256 * arr[..., 1].astype(np.int32)
    if mode == "L":
        return arr.astype(np.int32)
    raise BrodenFormatError(f"{path}: label PNG has mode {mode!r}; expected 8-bit RGB (id = R + 256*G)")


def _depth_words(rawmode: str) -> str:
    if ";16" in rawmode:
        return "16 bits per sample"
    if rawmode.startswith(("LA", "PA")):
        return "gray or palette with alpha"
    if rawmode.startswith("P"):
        return "palette indices"
    return "fewer than 8 bits per sample"


def decode_image(path: str | Path) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB, the one image decoder of the package.

    8-bit images convert as Pillow converts them. 16-bit samples become 8 bits
    by keeping the high byte (value >> 8): modes I;16*, mode 'I' from the PNG
    and PPM readers (16-bit scale), and 16-bit RGB(A) PNGs (Pillow already keeps
    their high byte). Float ('F') and other 32-bit ('I') images have no known
    range and are refused. Errors raise BrodenFormatError naming the file.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb8(img, path)
    except BrodenFormatError:
        raise
    except FileNotFoundError:
        raise BrodenFormatError(f"{path}: image not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BrodenFormatError(f"{path}: cannot decode image ({e})") from None


def _to_rgb8(img: Image.Image, path: Path) -> np.ndarray:
    mode = img.mode
    if mode.startswith("I;16") or (mode == "I" and img.format in _SIXTEEN_BIT_I_FORMATS):
        arr = np.asarray(img)
        if mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise BrodenFormatError(f"{path}: image mode 'I' holds values {arr.min()}..{arr.max()}, "
                                    f"outside the 16-bit range 0..65535")
        gray = (arr.astype(np.uint32) >> 8).astype(np.uint8)  # (H, W); any byte order
        return np.repeat(gray[..., None], 3, axis=2)
    if mode in ("I", "F"):
        kind = "32-bit integer" if mode == "I" else "floating-point"
        raise BrodenFormatError(f"{path}: image mode {mode!r} ({kind} samples of unknown range) cannot be "
                                f"mapped to 8 bits; expected 8- or 16-bit samples")
    return np.asarray(img.convert("RGB"))


def decode_record_image(meta: BrodenMeta, record: ImageRecord) -> np.ndarray:
    """Decode the image of an index.csv row to (H, W, 3) uint8, checking it against the row's ih x iw.

    Errors (undecodable file, size the index does not announce) name index.csv and the row.
    """
    where = f"{meta.root / 'index.csv'}, line {record.line}: image {record.image!r}"
    try:
        image = decode_image(meta.image_path(record))
    except BrodenFormatError as e:
        raise BrodenFormatError(f"{where}: {e}") from None
    if image.shape[:2] != (record.ih, record.iw):
        raise BrodenFormatError(f"{where} is {image.shape[0]}x{image.shape[1]} (h x w), but the index says "
                                f"ih x iw = {record.ih}x{record.iw}")
    return image


def _read_csv(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield (1-based line number, cells) for every non-blank row of a UTF-8 CSV file."""
    if not path.is_file():
        raise BrodenFormatError(f"{path}: missing (a Broden directory needs it)")
    reader = csv.reader(io.StringIO(_utf8_text(path), newline=""))
    start = 1
    for row in reader:
        if any(cell.strip() for cell in row):
            yield start, row
        start = reader.line_num + 1


def _utf8_text(path: Path) -> str:
    """The file decoded as UTF-8, decoded whole so that a bad byte's line can be named."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise BrodenFormatError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                                f"{e.start}); Broden tables are UTF-8, re-save it as UTF-8") from None


def _int_cell(path: Path, line: int, column: str, value: str, minimum: int = 0) -> int:
    value = value.strip()
    if not _INT_RE.match(value):
        raise BrodenFormatError(f"{path}, line {line}: column {column!r} must be an integer, got {value!r}")
    number = int(value)
    if number < minimum:
        raise BrodenFormatError(f"{path}, line {line}: column {column!r} must be >= {minimum}, got {number}")
    return number


def _float_cell(path: Path, line: int, column: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise BrodenFormatError(f"{path}, line {line}: column {column!r} must be a number, got {value!r}") from None


def _header(path: Path, rows: Iterator[tuple[int, list[str]]], required: tuple[str, ...]) -> dict[str, int]:
    """Read the header row and return column name -> position; every `required` column must exist."""
    first = next(rows, None)
    if first is None:
        raise BrodenFormatError(f"{path}: empty file; expected a header with columns {list(required)}")
    _, header = first
    header = [h.strip() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        raise BrodenFormatError(f"{path}, line 1: header lacks columns {missing}; got {header}")
    return {name: i for i, name in enumerate(header)}


def _cell(path: Path, line: int, row: list[str], cols: dict[str, int], name: str) -> str:
    i = cols[name]
    if i >= len(row):
        raise BrodenFormatError(f"{path}, line {line}: row has {len(row)} cells, no column {name!r}")
    return row[i]


def _read_categories(root: Path) -> list[str]:
    path = root / "category.csv"
    rows = _read_csv(path)
    cols = _header(path, rows, ("name",))
    categories: list[str] = []
    for line, row in rows:
        name = _cell(path, line, row, cols, "name").strip()
        if not name:
            raise BrodenFormatError(f"{path}, line {line}: empty category name")
        if name in categories:
            raise BrodenFormatError(f"{path}, line {line}: category {name!r} listed twice")
        categories.append(name)
    if not categories:
        raise BrodenFormatError(f"{path}: lists no category")
    return categories


def _read_label_names(root: Path) -> dict[int, str]:
    path = root / "label.csv"
    rows = _read_csv(path)
    cols = _header(path, rows, ("number", "name"))
    names: dict[int, str] = {}
    for line, row in rows:
        number = _int_cell(path, line, "number", _cell(path, line, row, cols, "number"), minimum=1)
        if number in names:
            raise BrodenFormatError(f"{path}, line {line}: label id {number} listed twice")
        names[number] = _cell(path, line, row, cols, "name").strip()
    return names


def _read_coverage(root: Path, category: str, known: dict[int, str]) -> dict[int, float]:
    path = root / f"c_{category}.csv"
    rows = _read_csv(path)
    cols = _header(path, rows, ("number", "coverage"))
    coverage: dict[int, float] = {}
    for line, row in rows:
        number = _int_cell(path, line, "number", _cell(path, line, row, cols, "number"), minimum=1)
        if number not in known:
            raise BrodenFormatError(f"{path}, line {line}: label id {number} is not in label.csv")
        coverage[number] = _float_cell(path, line, "coverage", _cell(path, line, row, cols, "coverage"))
    return coverage


def _parse_index(root: Path, categories: list[str], known: dict[int, str]) -> list[ImageRecord]:
    path = root / "index.csv"
    rows = _read_csv(path)
    first = next(rows, None)
    expected = list(INDEX_FIXED_COLUMNS) + categories
    if first is None:
        raise BrodenFormatError(f"{path}: empty file; expected header {','.join(expected)}")
    header = [h.strip() for h in first[1]]
    if header != expected:
        raise BrodenFormatError(
            f"{path}, line 1: not a Broden index header; expected {','.join(expected)} "
            f"(image,split,ih,iw,sh,sw then the categories of category.csv), got {','.join(header)}")
    records: list[ImageRecord] = []
    for line, row in rows:
        if len(row) != len(expected):
            raise BrodenFormatError(f"{path}, line {line}: {len(row)} cells, expected {len(expected)}")
        image = row[0].strip()
        split = row[1].strip()
        if not image:
            raise BrodenFormatError(f"{path}, line {line}: empty 'image' cell")
        if _suspect(image):
            _check_relpath(path, line, "image", image)
        if not split:
            raise BrodenFormatError(f"{path}, line {line}: empty 'split' cell")
        ih, iw, sh, sw = (_int_cell(path, line, c, row[2 + i], minimum=1)
                          for i, c in enumerate(("ih", "iw", "sh", "sw")))
        layers: dict[str, list[str]] = {}
        image_labels: dict[str, list[int]] = {}
        for c, cell in zip(categories, row[6:]):
            cell = cell.strip()
            if not cell:
                continue
            for entry in cell.split(";"):
                entry = entry.strip()
                if not entry:
                    raise BrodenFormatError(
                        f"{path}, line {line}: column {c!r} has an empty entry in {cell!r} "
                        f"(entries are ';'-separated ids or PNG paths)")
                if _INT_RE.match(entry):
                    number = int(entry)
                    if number < 1:
                        raise BrodenFormatError(
                            f"{path}, line {line}: column {c!r}: image-level label {number} must be a positive id")
                    if number not in known:
                        raise BrodenFormatError(
                            f"{path}, line {line}: column {c!r}: label id {number} is not in label.csv")
                    image_labels.setdefault(c, []).append(number)
                else:
                    if _suspect(entry):
                        _check_relpath(path, line, f"column {c!r}: PNG", entry)
                    layers.setdefault(c, []).append(entry)
        records.append(ImageRecord(len(records), line, image, split, ih, iw, sh, sw, layers, image_labels))
    if not records:
        raise BrodenFormatError(f"{path}: header only, no image rows; a Broden index lists at least one image")
    return records


def _suspect(rel: str) -> bool:
    """Cheap test run on every path: only these need _check_relpath's full look."""
    return rel[0] in "/\\" or ".." in rel or ":" in rel or "\0" in rel


def _check_relpath(index: Path, line: int, what: str, rel: str) -> None:
    """Refuse, from the text alone, a path that cannot name a file inside images/."""
    if "\0" in rel:
        problem = "contains a NUL byte"
    elif rel.startswith("/") or os.path.isabs(rel):
        problem = "is absolute; expected a path relative to images/"
    elif ".." in rel and (posixpath.normpath(rel) + "/").startswith("../"):
        problem = f"leads out of {index.parent / 'images'} through '..'; paths must stay inside images/"
    else:
        return
    raise BrodenFormatError(f"{index}, line {line}: {what} {rel!r} {problem}")


def _inside(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip(os.sep) + os.sep)


def _symlink_names(directory: str) -> set[str]:
    """Names of the symbolic links in `directory` (one scandir, no stat per file); empty if unreadable."""
    try:
        with os.scandir(directory) as entries:
            return {e.name for e in entries if e.is_symlink()}
    except OSError:  # missing or unreadable: reported when its files are read
        return set()


def _record_paths(record: ImageRecord) -> Iterator[tuple[str, str]]:
    """(what, path) of a record's image and every PNG, for messages."""
    yield "image", record.image
    for c, pngs in record.layers.items():
        for p in pngs:
            yield f"column {c!r}: PNG", p


def _check_links(root: Path, records: list[ImageRecord]) -> None:
    """Refuse entries that a symbolic link takes outside images/.

    Costs one realpath and one scandir per directory named in index.csv, plus one
    realpath per entry that is itself a link: done once here, never per item read.
    """
    images = root / "images"
    base = os.path.realpath(images)  # images/ itself may be a link: the dataset's own image store
    directories: set[str] = set()
    for r in records:
        directories.add(r.image.rpartition("/")[0])
        for pngs in r.layers.values():
            directories.update(p.rpartition("/")[0] for p in pngs)
    escaping: dict[str, str] = {}  # directory -> where it resolves, outside images/
    links: dict[str, set[str]] = {}  # directory -> names of its symbolic links
    for d in directories:
        real = os.path.realpath(images / d) if d else base
        if not _inside(real, base):
            escaping[d] = real
        elif names := _symlink_names(os.path.join(images, d)):
            links[d] = names
    if not escaping and not links:
        return
    for r in records:  # in file order, so the first offending row is named
        for what, rel in _record_paths(r):
            d, _, name = rel.rpartition("/")
            if d in escaping:
                _raise_link_error(root, r, what, rel, escaping[d])
            if name in links.get(d, ()):
                real = os.path.realpath(images / rel)
                if not _inside(real, base):
                    _raise_link_error(root, r, what, rel, real)


def _raise_link_error(root: Path, record: ImageRecord, what: str, rel: str, real: str) -> NoReturn:
    raise BrodenFormatError(
        f"{root / 'index.csv'}, line {record.line}: {what} {rel!r} goes through a symbolic link and "
        f"resolves to {real}, outside {root / 'images'}; pass allow_outside_links=True "
        f"(dissect run --allow-outside-links) to follow links out of the dataset")


def load_meta(root: str | Path, check_files: bool = False, allow_outside_links: bool = False) -> BrodenMeta:
    """Parse category.csv, label.csv, every c_<cat>.csv and index.csv of a Broden directory.

    A label's primary category is the one whose c_<cat>.csv gives it the largest
    coverage, ties going to the later category (reference rule). With
    `check_files`, every referenced image and PNG must exist. Every image and
    PNG path must stay inside `images/`: absolute paths and '..' escapes are
    refused, and so are symbolic links resolving outside it unless
    `allow_outside_links`.
    """
    root = Path(root)
    if not root.is_dir():
        raise BrodenFormatError(f"{root}: not a directory (expected a Broden dataset directory)")
    categories = _read_categories(root)
    names = _read_label_names(root)
    coverage = {c: _read_coverage(root, c, names) for c in categories}

    num_labels = max(names, default=0) + 1
    label_names = [""] * num_labels
    label_names[0] = "-"
    label_category = np.full(num_labels, -1, dtype=np.int64)
    labels: dict[int, LabelInfo] = {}
    for number, name in sorted(names.items()):
        label_names[number] = name
        cov = {c: coverage[c][number] for c in categories if number in coverage[c]}
        best, best_cov = None, None
        for ci, c in enumerate(categories):
            # '>=' so that a tie goes to the later category
            if c in cov and (best_cov is None or cov[c] >= best_cov):
                best, best_cov = ci, cov[c]
        if best is not None:
            label_category[number] = best
        labels[number] = LabelInfo(number, name, categories[best] if best is not None else None, cov)

    meta = BrodenMeta(root, categories, labels, label_names, label_category,
                      _parse_index(root, categories, names))
    if not allow_outside_links:
        _check_links(root, meta.records)
    if check_files:
        problems = _missing_files(meta)
        if problems:
            raise BrodenFormatError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return meta


def _missing_files(meta: BrodenMeta) -> list[str]:
    index = meta.root / "index.csv"
    problems: list[str] = []
    for r in meta.records:
        if not meta.image_path(r).is_file():
            problems.append(f"{index}, line {r.line}: image {r.image!r} not found under {meta.root / 'images'}")
        for c, pngs in r.layers.items():
            for p in pngs:
                if not meta.png_path(p).is_file():
                    problems.append(f"{index}, line {r.line}: column {c!r}: PNG {p!r} not found "
                                    f"under {meta.root / 'images'}")
    return problems


def check_label_plane(meta: BrodenMeta, record: ImageRecord, relpath: str, plane: np.ndarray,
                      known: np.ndarray | None = None) -> None:
    """Raise BrodenFormatError if a decoded PNG disagrees with sh/sw or holds ids label.csv lacks.

    `known` is an optional precomputed (65536,) bool table of valid ids (0 included).
    """
    where = f"{meta.root / 'index.csv'}, line {record.line}: PNG {relpath!r}"
    if plane.shape != (record.sh, record.sw):
        raise BrodenFormatError(f"{where} is {plane.shape[0]}x{plane.shape[1]} (h x w), "
                                f"expected sh x sw = {record.sh}x{record.sw}")
    if known is None:
        known = known_id_table(meta)
    bad = ~known[plane]
    if bad.any():
        ids = np.unique(plane[bad])
        raise BrodenFormatError(f"{where} holds label ids not in label.csv: {ids[:10].tolist()}")


def check_uniform_sizes(meta: BrodenMeta, rows: Iterable[int] | None, purpose: str) -> tuple[
        tuple[int, int], tuple[int, int]]:
    """The one (ih, iw) and one (sh, sw) that index rows `rows` (default all) share; else BrodenFormatError.

    The message names index.csv, the first row that differs and the row it differs
    from; `purpose` says what needs one size ("a batch", "the decoded cache").
    Decoding checks each file against its row, so equal rows mean equal tensors.
    """
    records = meta.records if rows is None else [meta.records[int(i)] for i in rows]
    first = records[0]
    where = meta.root / "index.csv"
    for r in records:
        if (r.ih, r.iw) != (first.ih, first.iw):
            raise BrodenFormatError(
                f"{where}, line {r.line}: image {r.image!r} is {r.ih}x{r.iw} (ih x iw) but line {first.line} "
                f"(image {first.image!r}) is {first.ih}x{first.iw}; {purpose} needs one image size")
    for r in records:
        if (r.sh, r.sw) != (first.sh, first.sw):
            raise BrodenFormatError(
                f"{where}, line {r.line}: image {r.image!r} has label maps of {r.sh}x{r.sw} (sh x sw) but line "
                f"{first.line} (image {first.image!r}) has {first.sh}x{first.sw}; {purpose} needs one label size")
    return (first.ih, first.iw), (first.sh, first.sw)


def known_id_table(meta: BrodenMeta) -> np.ndarray:
    """(65536,) bool: True for 0 and every id of label.csv (PNG ids lie in 0..65535)."""
    known = np.zeros(65536, dtype=bool)
    known[0] = True
    ids = np.fromiter(meta.labels.keys(), dtype=np.int64, count=len(meta.labels))
    known[ids[ids < 65536]] = True
    return known


def validate(root: str | Path, check_files: bool = True, decode: bool = False,
             strict: bool = False, allow_outside_links: bool = False) -> list[str]:
    """Check a Broden directory; return the list of problems found (empty: valid).

    Structural errors (missing tables, bad header, malformed cells, unknown
    image-level ids) raise BrodenFormatError from `load_meta`. `check_files`
    also reports missing images and PNGs; `decode` decodes every PNG and image
    and reports size mismatches and unknown ids. With `strict`, any problem raises.
    `allow_outside_links` is load_meta's.
    """
    meta = load_meta(root, allow_outside_links=allow_outside_links)
    problems: list[str] = []
    if check_files or decode:
        problems.extend(_missing_files(meta))
    if decode:
        known = known_id_table(meta)
        for r in meta.records:
            if meta.image_path(r).is_file():
                try:
                    decode_record_image(meta, r)
                except BrodenFormatError as e:
                    problems.append(str(e))
            for pngs in r.layers.values():
                for p in pngs:
                    if not meta.png_path(p).is_file():
                        continue
                    try:
                        check_label_plane(meta, r, p, decode_label_png(meta.png_path(p)), known)
                    except BrodenFormatError as e:
                        problems.append(str(e))
    if strict and problems:
        raise BrodenFormatError(f"{len(problems)} problem(s) in {meta.root}:\n" + "\n".join(problems))
    return problems
