"""Writing a decoded cache row by row: the staging directory both build paths share.

`CacheWriter` lays out the arrays of broden.cache (same format, docs/contracts.md)
for a list of index rows in a marked temporary directory (broden.tmpdirs) beside
the target, fills them as rows are decoded, and serves the rows already written
(a dataset reads them back instead of decoding again). When it holds every row
of index.csv it can `finish`: meta.json is written last and the directory is
renamed to `<cache_dir>/decoded/<fingerprint>`, so a reader only ever sees a
complete cache. A writer over fewer rows (a --limit/--split run) is a scratch
store for one run, removed by `discard`; a killed process leaves a marked
directory that the next build removes (broden.cache.remove_stale_builds).

Before anything is written, the free space of the target filesystem is checked
against what the arrays need (`CacheSpaceError` says how much), and the arrays'
blocks are reserved (posix_fallocate).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from broden import tmpdirs
from broden.cache import CACHE_FORMAT, CACHE_VERSION, open_decoded
from broden.errors import InputError
from broden.format import BrodenMeta, check_uniform_sizes

__all__ = ["CacheArrays", "CacheWriter", "CacheSpaceError", "cache_bytes", "HEADROOM_BYTES"]

log = logging.getLogger(__name__)

HEADROOM_BYTES = 64 * 2 ** 20  # left free beyond what the arrays need: a full disk breaks everything else


class CacheSpaceError(InputError):
    """Not enough free disk space for a decoded cache (the message says how much is needed)."""


@dataclass(frozen=True)
class CacheArrays:
    """The arrays a decoded cache is made of (memory maps for the large ones), indexed by slot."""

    images: np.ndarray
    planes: np.ndarray
    plane_offsets: np.ndarray
    plane_category: np.ndarray
    image_labels: np.ndarray
    image_label_offsets: np.ndarray
    image_label_category: np.ndarray
    label_shape: tuple[int, int]


def _offsets(counts: list[int]) -> np.ndarray:
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(np.asarray(counts, dtype=np.int64), out=out[1:])
    return out


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def cache_bytes(meta: BrodenMeta, rows: Sequence[int] | None = None) -> int:
    """Bytes the decoded arrays of `rows` (default all) take on disk."""
    records = meta.records if rows is None else [meta.records[int(r)] for r in rows]
    if not records:
        return 0
    (h, w), (sh, sw) = check_uniform_sizes(meta, [r.index for r in records], "the decoded cache")
    planes = sum(len(p) for r in records for p in r.layers.values())
    labels = sum(len(v) for r in records for v in r.image_labels.values())
    item = 2 if meta.num_labels - 1 <= 32767 else 4
    return (len(records) * 3 * h * w + planes * sh * sw * item + 2 * 8 * (len(records) + 1)
            + planes * 2 + labels * 6 + 4096)


def _reserve(path: Path, need: int) -> None:
    """Allocate the blocks of a memory-mapped file now: a disk that fills up later must not turn a
    write into the map into SIGBUS. Filesystems without the call keep the sparse file."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise CacheSpaceError(f"the decoded cache needs {_gib(need)} in {path.parent.parent}, more than "
                                  f"is free; free some space or point --cache-dir (or $DISSECT_CACHE_DIR) at a "
                                  f"disk with room") from None
    except AttributeError:  # no posix_fallocate on this platform
        pass
    finally:
        os.close(fd)


class CacheWriter:
    """A decoded cache of index rows `rows` (slot i holds row rows[i]) being written in a marked temporary directory.

    Thread-safe for writes of different slots; `written[slot]` turns True once a
    slot's image and planes are in place. `persistent` writers (rows = every row
    of index.csv) may `finish` into the cache directory; the others only `discard`.
    """

    def __init__(self, meta: BrodenMeta, rows: Sequence[int], base: str | Path, fingerprint: str,
                 fingerprint_mode: str = "stat", purpose: str = "cache-build"):
        self.meta = meta
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if self.rows.size == 0:
            raise InputError(f"{meta.root / 'index.csv'}: no images to cache")
        self.base = Path(base)
        self.fingerprint = fingerprint
        self.fingerprint_mode = fingerprint_mode
        self.persistent = (self.rows.size == meta.num_images
                           and bool((self.rows == np.arange(meta.num_images)).all()))
        records = [meta.records[int(r)] for r in self.rows]
        (h, w), (sh, sw) = check_uniform_sizes(meta, self.rows, "the decoded cache")
        self.image_shape, self.label_shape = (3, h, w), (sh, sw)
        cat_index = {c: i for i, c in enumerate(meta.categories)}
        plane_counts = [sum(len(r.layers.get(c, [])) for c in meta.categories) for r in records]
        label_lists = [[(cat_index[c], n) for c in meta.categories for n in r.image_labels.get(c, [])]
                       for r in records]
        plane_offsets = _offsets(plane_counts)
        label_offsets = _offsets([len(x) for x in label_lists])
        plane_category = np.asarray([cat_index[c] for r in records for c in meta.categories
                                     for _ in r.layers.get(c, [])], dtype=np.int16)
        flat = [x for xs in label_lists for x in xs]
        image_label_category = np.asarray([c for c, _ in flat], dtype=np.int16)
        image_labels = np.asarray([n for _, n in flat], dtype=np.int32)
        # int16 holds every id up to 32767; beyond that the contract says int32
        self.plane_dtype = np.int16 if meta.num_labels - 1 <= 32767 else np.int32
        n, p = int(self.rows.size), int(plane_offsets[-1])

        need = cache_bytes(meta, self.rows)
        self.base.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.base).free
        if free < need + HEADROOM_BYTES:
            raise CacheSpaceError(
                f"the decoded cache of {meta.root} ({n} images) needs {_gib(need)} (+{_gib(HEADROOM_BYTES)} "
                f"headroom) in {self.base}, but only {_gib(free)} are free; free some space or point "
                f"--cache-dir (or $DISSECT_CACHE_DIR) at a disk with room")

        self.tmp, self._lock_fd = tmpdirs.make_marked_tempdir(
            self.base, f".tmp-{fingerprint[:16]}-{os.getpid()}-", purpose)
        try:
            images = np.lib.format.open_memmap(self.tmp / "images.npy", mode="w+", dtype=np.uint8,
                                               shape=(n, 3, h, w))
            planes = np.lib.format.open_memmap(self.tmp / "planes.npy", mode="w+", dtype=self.plane_dtype,
                                               shape=(p, sh, sw))
            for name in ("images.npy", "planes.npy"):
                _reserve(self.tmp / name, need)
            small = {"plane_offsets": plane_offsets, "plane_category": plane_category,
                     "image_labels": image_labels, "image_label_offsets": label_offsets,
                     "image_label_category": image_label_category}
            for name, arr in small.items():
                np.save(self.tmp / f"{name}.npy", arr)
        except BaseException:
            self._remove()
            raise
        self.arrays: CacheArrays | None = CacheArrays(images, planes, label_shape=(sh, sw), **small)
        self.written = np.zeros(n, dtype=bool)
        self._done = 0
        self._lock = threading.Lock()
        self.finished: Path | None = None

    @property
    def complete(self) -> bool:
        """Every slot written."""
        return self._done == self.rows.size

    def write(self, slot: int, image: np.ndarray, planes: list[np.ndarray]) -> None:
        """Store slot `slot`'s (H, W, 3) uint8 image and its label planes (category then cell order)."""
        arrays = self.arrays
        if arrays is None:
            raise RuntimeError(f"cache writer {self.tmp} is closed")
        arrays.images[slot] = image.transpose(2, 0, 1)
        if planes:
            lo, hi = arrays.plane_offsets[slot], arrays.plane_offsets[slot + 1]
            arrays.planes[lo:hi] = np.stack(planes)
        with self._lock:  # marked only once its data is in place: readers may slice it right away
            if not self.written[slot]:
                self.written[slot] = True
                self._done += 1

    def _info(self) -> dict:
        a = self.arrays
        assert a is not None
        return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "fingerprint": self.fingerprint,
                "source": str(Path(self.meta.root).resolve()), "categories": self.meta.categories,
                "num_images": int(self.rows.size), "image_shape": list(self.image_shape),
                "label_shape": list(self.label_shape), "num_planes": int(a.planes.shape[0]),
                "num_image_labels": int(a.image_labels.size), "plane_dtype": np.dtype(self.plane_dtype).name,
                "fingerprint_mode": self.fingerprint_mode}

    def finish(self, replace: bool = False) -> Path:
        """Make the complete cache visible at `<base>/<fingerprint>` and return that path.

        An existing good cache there is kept (another process finished first) unless
        `replace`; a stale or incomplete one is replaced. On failure the staging
        directory stays, still readable, until `discard`.
        """
        if not (self.persistent and self.complete):
            raise RuntimeError(f"cache writer {self.tmp}: only a complete writer of every row can finish")
        with self._lock:
            if self.finished is not None:
                return self.finished
            a = self.arrays
            assert a is not None
            a.images.flush()
            a.planes.flush()
            # meta.json last: its presence is what marks the directory complete
            (self.tmp / "meta.json").write_text(json.dumps(self._info(), indent=1) + "\n")
            target = self.base / self.fingerprint
            if target.exists():
                if not replace and open_decoded(target, self.meta.root, self.meta, self.fingerprint) is not None:
                    log.info("decoded cache %s was completed by another process; keeping it", target)
                    self.finished = target
                    self._remove()
                    return target
                shutil.rmtree(target)  # stale, incomplete or replaced on request
            try:
                os.rename(self.tmp, target)
            except OSError:
                # another process finished the same build first; keep theirs if it is good
                if open_decoded(target, self.meta.root, self.meta, self.fingerprint) is None:
                    (self.tmp / "meta.json").unlink(missing_ok=True)
                    raise
                self._remove()
            else:
                for name in (tmpdirs.MARKER, tmpdirs.LOCK):  # bookkeeping of the build, not part of the cache
                    (target / name).unlink(missing_ok=True)
                self.tmp = target
                self._release()
            self.finished = target
        log.info("built decoded cache %s (%d images, %d planes)", target, self.rows.size, a.planes.shape[0])
        return target

    def _release(self) -> None:
        if self._lock_fd is not None:
            tmpdirs.release(self._lock_fd)
            self._lock_fd = None

    def _remove(self) -> None:
        self.arrays = None  # readers holding the arrays keep their maps; the files go with the directory
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._release()

    def discard(self) -> None:
        """Remove the staging directory (unless it became the cache) and let go of the lock (idempotent)."""
        if self.finished is not None:
            self.arrays = None
            self._release()
            return
        if self.arrays is not None or self._lock_fd is not None:
            self._remove()
