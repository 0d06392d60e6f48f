"""The decoded cache: every image and label PNG of a Broden directory decoded once into .npy arrays.

Layout (docs/contracts.md), under `<cache_dir>/decoded/<fingerprint>/`:
images.npy (N, 3, H, W) uint8, planes.npy (P, sh, sw) int16 (int32 when an id
exceeds 32767), plane_offsets.npy (N+1,) int64, plane_category.npy (P,) int16,
image_labels.npy (Q,) int32, image_label_offsets.npy (N+1,) int64,
image_label_category.npy (Q,) int16, and meta.json, written last.

A build happens in a temporary directory beside the target and is renamed into
place only when complete (broden.cache_writer, shared by `build_cache` and by
datasets that write the cache while their first pass decodes), so a directory without meta.json, or a leftover
temporary one, is never read. The temporary directory is a marked one
(broden.tmpdirs): the building process holds an exclusive flock on `<tmp>/.lock`
and records itself in `<tmp>/owner.json` (tool, purpose, host, pid). A build
killed hard (SIGKILL) leaves its temporary directory behind; the next build
removes it when it is stale: its lock is free while its owner record exists
(the kernel drops a dead process's locks), its owner is a dead process on this
host, or, its owner being elsewhere or unknown, nothing in it changed for
`stale_after` seconds (an hour by default). A live build is never touched.
Leftovers of other targets (a source that changed since) go by the same rules,
but only with an owner record; a leftover of the same target without one
(killed before writing it) goes after `stale_after` seconds without change.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from broden import tmpdirs
from broden.errors import BrodenFormatError, InputError
from broden.format import (BrodenMeta, ImageRecord, check_label_plane, check_uniform_sizes, decode_label_png,
                           decode_record_image, known_id_table, load_meta)

__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "DecodedCache",
    "source_fingerprint",
    "default_cache_dir",
    "build_cache",
    "open_cache",
    "open_decoded",
    "remove_stale_builds",
    "STALE_AFTER_S",
    "FINGERPRINT_MODES",
]

log = logging.getLogger(__name__)

CACHE_FORMAT = "broden-decoded-cache"
CACHE_VERSION = 1
_SMALL = ("plane_offsets", "plane_category", "image_label_offsets", "image_label_category")
_LARGE = ("images", "planes", "image_labels")
STALE_AFTER_S = 3600.0
_BUILD_NAME = re.compile(r"^\.tmp-[0-9a-f]{16}-\d+-")  # mkdtemp prefix of build_cache's temporary dirs


class DecodedCache:
    """A built decoded cache: large arrays memory-mapped read-only, offsets loaded in memory.

    Arrays open on first use, and pickling drops them, so DataLoader workers
    reopen their own maps instead of copying the data.
    """

    def __init__(self, path: str | Path, info: dict[str, Any]):
        self.path = Path(path)
        self.info = info
        self._arrays: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "info": self.info, "_arrays": {}}

    def _array(self, name: str) -> np.ndarray:
        arr = self._arrays.get(name)
        if arr is None:
            arr = np.load(self.path / f"{name}.npy", mmap_mode="r" if name in _LARGE else None)
            self._arrays[name] = arr
        return arr

    @property
    def images(self) -> np.ndarray:
        """(N, 3, H, W) uint8, memory-mapped."""
        return self._array("images")

    @property
    def planes(self) -> np.ndarray:
        """(P, sh, sw) int16 or int32, memory-mapped."""
        return self._array("planes")

    @property
    def plane_offsets(self) -> np.ndarray:
        """(N+1,) int64: planes of row r are planes[plane_offsets[r]:plane_offsets[r+1]]."""
        return self._array("plane_offsets")

    @property
    def plane_category(self) -> np.ndarray:
        """(P,) int16: category index of each plane."""
        return self._array("plane_category")

    @property
    def image_labels(self) -> np.ndarray:
        """(Q,) int32 image-level label ids, memory-mapped."""
        return self._array("image_labels")

    @property
    def image_label_offsets(self) -> np.ndarray:
        """(N+1,) int64: offsets of each row's image-level labels."""
        return self._array("image_label_offsets")

    @property
    def image_label_category(self) -> np.ndarray:
        """(Q,) int16: category index of each image-level label."""
        return self._array("image_label_category")

    @property
    def num_images(self) -> int:
        """N, the number of rows of index.csv."""
        return int(self.info["num_images"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(3, H, W) shared by every image."""
        return tuple(self.info["image_shape"])

    @property
    def label_shape(self) -> tuple[int, int]:
        """(sh, sw) shared by every label map."""
        return tuple(self.info["label_shape"])


def default_cache_dir() -> Path:
    """$DISSECT_CACHE_DIR, else ~/.cache/concept-dissect."""
    env = os.environ.get("DISSECT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "concept-dissect"


def _record_files(record: ImageRecord) -> list[str]:
    return [record.image] + [p for pngs in record.layers.values() for p in pngs]


FINGERPRINT_MODES = ("stat", "content")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):  # hashlib releases the GIL on chunks this size: threads run in parallel
            h.update(chunk)
    return h.hexdigest()


def source_fingerprint(root: str | Path, meta: BrodenMeta | None = None, mode: str = "stat",
                       progress: bool = False, workers: int | None = None) -> str:
    """sha256 over the CSV tables' contents and, per referenced image and PNG, its size + mtime_ns
    (mode "stat") or the sha256 of its bytes (mode "content").

    "stat" costs one stat per file (seconds on the 63k images of Broden) but misses an
    edit that keeps a file's size and mtime; "content" reads every byte, hashed by
    `workers` threads (default: the available cores), with a progress bar when
    `progress`. The mode is part of the hash, so the two never name the same cache;
    "stat" fingerprints are those of earlier versions (existing caches stay valid).
    """
    if mode not in FINGERPRINT_MODES:
        raise InputError(f"fingerprint: expected one of {', '.join(FINGERPRINT_MODES)}, got {mode!r}")
    root = Path(root)
    meta = meta if meta is not None else load_meta(root)
    preamble = f"{CACHE_FORMAT}:{CACHE_VERSION}" + (":content" if mode == "content" else "")
    h = hashlib.sha256(f"{preamble}\n".encode())
    tables = ["index.csv", "label.csv", "category.csv"] + sorted(p.name for p in root.glob("c_*.csv"))
    for name in tables:
        data = (root / name).read_bytes()
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    images = root / "images"
    files = [(r, rel) for r in meta.records for rel in _record_files(r)]

    def missing(r: ImageRecord, rel: str) -> BrodenFormatError:
        return BrodenFormatError(f"{root / 'index.csv'}, line {r.line}: {rel!r} not found under {images}")

    lines = []
    if mode == "stat":
        for r, rel in files:
            try:
                st = os.stat(images / rel)
            except FileNotFoundError:
                raise missing(r, rel) from None
            lines.append(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n")
    else:
        from broden._progress import progress as progress_bar
        from broden.loader import Prefetcher, available_cores

        def digest(item: tuple[ImageRecord, str]) -> str:
            try:
                return _file_digest(images / item[1])
            except FileNotFoundError:
                raise missing(*item) from None

        quiet = {} if progress else {"disable": True}
        bar = progress_bar(total=len(files), desc="hashing Broden files", unit="file", **quiet)
        threads = workers if workers is not None else available_cores()
        with Prefetcher(digest, files, threads=threads, depth=4 * max(threads, 1)) as hashes:
            for (r, rel), hexdigest in zip(files, hashes):
                lines.append(f"{rel}\0{hexdigest}\n")
                bar.update(1)
        bar.close()
    h.update("".join(lines).encode())
    return h.hexdigest()


def open_decoded(path: str | Path, root: str | Path, meta: BrodenMeta | None = None,
                 fingerprint: str | None = None) -> DecodedCache | None:
    """Open the decoded cache at `path` if it is complete and built from the current `root`; else None."""
    path = Path(path)
    meta_json = path / "meta.json"
    if not meta_json.is_file():
        return None
    try:
        info = json.loads(meta_json.read_text())
    except (OSError, ValueError):
        log.warning("unreadable %s: ignoring that cache", meta_json)
        return None
    if info.get("format") != CACHE_FORMAT or info.get("version") != CACHE_VERSION:
        return None
    if fingerprint is None:
        fingerprint = source_fingerprint(root, meta)
    if info.get("fingerprint") != fingerprint:
        return None
    cache = DecodedCache(path, info)
    n = int(info["num_images"])
    expected = {"images": (n, *info["image_shape"]), "plane_offsets": (n + 1,),
                "image_label_offsets": (n + 1,), "planes": (info["num_planes"], *info["label_shape"]),
                "plane_category": (info["num_planes"],), "image_labels": (info["num_image_labels"],),
                "image_label_category": (info["num_image_labels"],)}
    try:
        for name, shape in expected.items():
            if getattr(cache, name).shape != tuple(shape):
                log.warning("%s: %s.npy has shape %s, expected %s: ignoring that cache",
                            path, name, getattr(cache, name).shape, shape)
                return None
    except (OSError, ValueError) as e:
        log.warning("%s: cannot read cache arrays (%s): ignoring that cache", path, e)
        return None
    return cache


def open_cache(root: str | Path, cache_dir: str | Path | None = None,
               meta: BrodenMeta | None = None, fingerprint_mode: str = "stat",
               fingerprint: str | None = None) -> DecodedCache | None:
    """The decoded cache of `root` under `cache_dir` (default: default_cache_dir()), or None when missing or stale.

    A source with missing files has no cache (None); decoding then names the missing file.
    `fingerprint` (of `fingerprint_mode`) saves computing it again.
    """
    try:
        if fingerprint is None:
            fingerprint = source_fingerprint(root, meta, fingerprint_mode)
    except BrodenFormatError as e:
        log.debug("no cache lookup for %s: %s", root, e)
        return None
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return open_decoded(base / "decoded" / fingerprint, root, meta, fingerprint)


def _decode_record(meta: BrodenMeta, record: ImageRecord, known: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Decode one row: (H, W, 3) uint8 image and its label planes in category then cell order."""
    image = decode_record_image(meta, record)
    planes = []
    for c in meta.categories:
        for rel in record.layers.get(c, []):
            try:
                plane = decode_label_png(meta.png_path(rel))
            except BrodenFormatError as e:
                raise BrodenFormatError(f"{meta.root / 'index.csv'}, line {record.line}: PNG {rel!r}: {e}") from None
            check_label_plane(meta, record, rel, plane, known)
            planes.append(plane)
    return image, planes


def _other_targets(base: Path, fingerprint: str) -> list[Path]:
    """Temporary builds under `base` of other targets, by this module's name pattern."""
    own = f".tmp-{fingerprint[:16]}-"
    return [p for p in base.glob(".tmp-*") if _BUILD_NAME.match(p.name) and not p.name.startswith(own)]


def remove_stale_builds(base: str | Path, fingerprint: str, stale_after: float = STALE_AFTER_S) -> list[Path]:
    """Remove the leftover temporary build directories under `base` (the `decoded` directory) that no
    live build uses; return the removed paths.

    Those of target `fingerprint` follow the module docstring's rules (one without
    an owner record goes after `stale_after` seconds without change). Those of
    other targets, left by builds of a source that has changed since, are removed
    only when their owner record marks them as this module's (broden.tmpdirs).
    """
    base = Path(base)
    same = base.glob(f".tmp-{fingerprint[:16]}-*")
    removed = tmpdirs.remove_stale(same, stale_after, require_marker=False, what="temporary cache build")
    return removed + tmpdirs.remove_stale(_other_targets(base, fingerprint), stale_after,
                                          what="temporary cache build")


def build_cache(root: str | Path, cache_dir: str | Path | None = None, progress: bool = True,
                force: bool = False, workers: int | None = None, meta: BrodenMeta | None = None,
                stale_after: float = STALE_AFTER_S, fingerprint_mode: str = "stat",
                fingerprint: str | None = None) -> Path:
    """Decode every image and label PNG of `root` once; return the cache directory.

    An up-to-date cache is reused unless `force`. Images must share one size
    (Broden's do). `workers` threads decode in parallel (default: the available
    cores, at most 4). First removes leftover temporary builds of the same
    target that are stale (see the module docstring; `stale_after` seconds
    without change). `fingerprint_mode` ("stat" or "content") keys the cache
    (`source_fingerprint`). Raises broden.cache_writer.CacheSpaceError (an
    InputError) when the disk lacks the room, before writing anything.
    """
    from broden._progress import progress as progress_bar  # the toolkit's one tqdm helper
    from broden.cache_writer import CacheWriter
    from broden.loader import Prefetcher, available_cores

    root = Path(root)
    meta = meta if meta is not None else load_meta(root)
    if not meta.records:
        raise InputError(f"{root / 'index.csv'}: no images to cache")
    if fingerprint is None:
        fingerprint = source_fingerprint(root, meta, fingerprint_mode, progress=progress)
    base = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "decoded"
    target = base / fingerprint
    if base.is_dir():
        remove_stale_builds(base, fingerprint, stale_after)
    if not force and open_decoded(target, root, meta, fingerprint) is not None:
        log.info("decoded cache %s is up to date", target)
        return target

    check_uniform_sizes(meta, None, "the decoded cache")
    known = known_id_table(meta)
    n = len(meta.records)
    workers = workers if workers is not None else min(4, available_cores())
    writer = CacheWriter(meta, range(n), base, fingerprint, fingerprint_mode)
    try:
        quiet = {} if progress else {"disable": True}  # else the toolkit's quiet switch decides
        bar = progress_bar(total=n, desc="decoding Broden", unit="img", **quiet)
        # bounded look-ahead: decoded rows never pile up in memory; a failure stops the queued decodes
        with Prefetcher(lambda rec: _decode_record(meta, rec, known), meta.records, threads=max(workers, 1),
                        depth=max(64, 16 * max(workers, 1))) as decoded:
            # every decode checks its file against the row's ih x iw, so all are h x w
            for r, (image, row_planes) in zip(meta.records, decoded):
                writer.write(r.index, image, row_planes)
                bar.update(1)
        bar.close()
        return writer.finish(replace=force)
    finally:
        writer.discard()
