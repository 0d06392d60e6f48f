"""A torch Dataset over a Broden-format directory, reading the decoded cache when one exists.

Items follow docs/contracts.md: `index`, `image` (3, H, W) uint8, `labels`
(K, sh, sw) int32 (every label layer of the selected categories, in
category.csv order then cell order), `image_labels` (M,) int64.

With `write_cache=True` and no fresh cache, `get_batch` decodes each row once
and writes it into a staging cache (broden.cache_writer) that later batches
read back; when the selection is every row of index.csv, the staging cache
becomes the decoded cache as soon as its last row is written.
"""
from __future__ import annotations

import copy
import logging
import threading
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from broden import cache as cache_mod
from broden.cache_writer import CacheArrays, CacheSpaceError, CacheWriter
from broden.errors import BrodenFormatError, InputError
from broden.format import (BrodenMeta, ImageRecord, check_label_plane, check_uniform_sizes, decode_label_png,
                           decode_record_image, known_id_table, load_meta)

__all__ = ["BrodenDataset", "collate", "SPLITS", "IMAGE_RULES", "has_selected_data"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
# Which rows a dataset serves: "annotated" (NetDissect-Lite's index_has_any_data: a row with some
# data in a selected category) or "all" rows.
IMAGE_RULES = ("annotated", "all")


def has_selected_data(record: ImageRecord, categories: Sequence[str]) -> bool:
    """Whether `record` holds a label PNG or an image-level label in one of `categories`.

    NetDissect-Lite keeps exactly these rows (loadseg's index_has_any_data: any non-empty
    entry of a selected column); colour, when selected, labels nearly every image.
    """
    return any(record.layers.get(c) or record.image_labels.get(c) for c in categories)


def _decode_image(meta: BrodenMeta, record: ImageRecord) -> torch.Tensor:
    """Decode one row's image to a uint8 (3, H, W) tensor, naming the file and row on failure."""
    arr = decode_record_image(meta, record)  # (H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _decode_plane(meta: BrodenMeta, record: ImageRecord, relpath: str, known: np.ndarray) -> np.ndarray:
    """Decode and check one label PNG of a record: int32 (sh, sw)."""
    try:
        plane = decode_label_png(meta.png_path(relpath))
    except BrodenFormatError as e:
        raise BrodenFormatError(f"{meta.root / 'index.csv'}, line {record.line}: PNG {relpath!r}: {e}") from None
    check_label_plane(meta, record, relpath, plane, known)
    return plane


def _ragged_select(offsets: np.ndarray, category: np.ndarray, rows: np.ndarray,
                   keep_category: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Flatten the ragged entries of `rows` whose category is kept.

    Returns (flat entry indices, item of each entry, position within its item,
    max entries per item), all vectorised: no loop over rows.
    """
    starts = offsets[rows]
    counts = offsets[rows + 1] - starts  # (B,)
    item = np.repeat(np.arange(len(rows), dtype=np.int64), counts)
    first = np.cumsum(counts) - counts
    flat = starts[item] + np.arange(item.size, dtype=np.int64) - first[item]
    keep = keep_category[category[flat]] if flat.size else np.zeros(0, dtype=bool)
    flat, item = flat[keep], item[keep]
    kept = np.bincount(item, minlength=len(rows))  # (B,)
    pos = np.arange(item.size, dtype=np.int64) - (np.cumsum(kept) - kept)[item]
    return flat, item, pos, int(kept.max()) if kept.size else 0


def _take(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """array[rows] as an in-memory copy; a run of consecutive rows is one slice (one sequential read)."""
    if rows.size > 1 and rows[-1] - rows[0] == rows.size - 1 and (np.diff(rows) == 1).all():
        return np.array(array[rows[0]:rows[-1] + 1])
    return np.ascontiguousarray(array[rows])


def _same_shape(items: Sequence[dict[str, Any]], shapes: list[tuple[int, ...]], what: str, needs: str) -> None:
    """InputError naming the index.csv rows (items' `index`) of the first two shapes that differ."""
    for it, shape in zip(items, shapes):
        if shape != shapes[0]:
            raise InputError(
                f"collate: {what} differ in size: index.csv row {int(it['index'])} (0-based) has "
                f"{'x'.join(map(str, shape))} but row {int(items[0]['index'])} has "
                f"{'x'.join(map(str, shapes[0]))}; a batch needs one {needs}")


def collate(items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack dataset items into a batch; `labels` and `image_labels` are zero-padded to the longest."""
    if not items:
        raise InputError("collate: no items to batch")
    images = [it["image"] for it in items]
    _same_shape(items, [tuple(im.shape) for im in images], "images", "image size")
    _same_shape(items, [tuple(it["labels"].shape[1:]) for it in items], "label maps", "sh x sw")
    sh, sw = items[0]["labels"].shape[1:]
    b = len(items)
    kmax = max(it["labels"].shape[0] for it in items)
    mmax = max(it["image_labels"].shape[0] for it in items)
    labels = torch.zeros((b, kmax, sh, sw), dtype=torch.int32)  # (B, Kmax, sh, sw)
    image_labels = torch.zeros((b, mmax), dtype=torch.int64)  # (B, Mmax)
    for i, it in enumerate(items):
        labels[i, : it["labels"].shape[0]] = it["labels"]
        image_labels[i, : it["image_labels"].shape[0]] = it["image_labels"]
    return {
        "index": torch.tensor([int(it["index"]) for it in items], dtype=torch.int64),
        "image": torch.stack(images),  # (B, 3, H, W)
        "labels": labels,
        "image_labels": image_labels,
    }


class BrodenDataset(torch.utils.data.Dataset):
    """Rows of a Broden index as tensors.

    categories: which categories' layers and image-level labels to return
        (default all; always returned in category.csv order).
    split: keep only rows of this split ('train' or 'val'); None keeps both.
    images: "all" keeps every row; "annotated" only rows with data in a selected
        category (the reference's rule, `has_selected_data`; the default of
        `dissect run`). `dropped_images` counts the rows of the split it left out;
        `with_images` gives the same dataset under the other rule.
    limit: keep the first `limit` rows (after the split and images filters).
    cache: "auto" reads the decoded cache from the default cache dir when a
        fresh one exists, "off" always decodes, a path names a cache dir (or a
        decoded cache directly, as returned by broden.cache.build_cache).
    allow_outside_links: follow symbolic links in images/ that resolve outside
        it (default: refuse them, naming index.csv and the row; see load_meta).
    fingerprint: how the source is recognised ("stat": sizes and mtimes, "content":
        sha256 of every file; broden.cache.source_fingerprint), computed once, on first use.
    write_cache: when no fresh cache is found (cache "auto" or a cache dir), decode
        each row once in get_batch and write it into a staging cache read back by
        later batches: the decoded cache once every row of index.csv is written
        (a selection of fewer rows keeps it as a scratch store, removed by `close`).
        When the disk lacks the room, a warning says how much is needed and rows
        are decoded on the fly.
    rebuild: ignore an existing decoded cache (with write_cache, replace it).
    """

    def __init__(self, root: str | Path, categories: Sequence[str] | None = None, split: str | None = None,
                 limit: int | None = None, cache: str | Path = "auto", allow_outside_links: bool = False,
                 images: str = "all", fingerprint: str = "stat", write_cache: bool = False,
                 rebuild: bool = False):
        if fingerprint not in cache_mod.FINGERPRINT_MODES:
            raise InputError(f"fingerprint: expected one of {', '.join(cache_mod.FINGERPRINT_MODES)}, "
                             f"got {fingerprint!r}")
        self.fingerprint_mode = fingerprint
        self._fingerprint: str | None = None
        self._writer: CacheWriter | None = None
        self._finalizer: weakref.finalize | None = None
        self._lock = threading.Lock()
        self._rebuild = bool(rebuild)
        self.root = Path(root)
        self.meta: BrodenMeta = load_meta(self.root, allow_outside_links=allow_outside_links)
        if isinstance(categories, str):
            categories = [categories]
        if categories is None:
            selected = set(self.meta.categories)
        else:
            unknown = [c for c in categories if c not in self.meta.categories]
            if unknown:
                raise InputError(f"categories: {unknown} not in {self.root / 'category.csv'}; "
                                 f"available: {self.meta.categories}")
            selected = set(categories)
        self.categories: list[str] = [c for c in self.meta.categories if c in selected]
        self._keep_category = np.array([c in selected for c in self.meta.categories], dtype=bool)

        splits = set(SPLITS) | {r.split for r in self.meta.records}
        if split is not None and split not in splits:
            raise InputError(f"split: expected one of {sorted(splits)}, got {split!r}")
        if limit is not None and (not isinstance(limit, (int, np.integer)) or limit < 0):
            raise InputError(f"limit: expected a non-negative integer, got {limit!r}")
        # primaries among the selected categories, as the reference computes them
        self.label_category: np.ndarray = self.meta.primary_categories(self.categories)
        self.split = split
        self.limit = None if limit is None else int(limit)
        self._select_rows(images)
        self._known: np.ndarray | None = None
        self.cache = self._open_cache(cache, rebuild, write_cache)
        if write_cache and self.cache is None and not (isinstance(cache, str) and cache == "off"):
            self._start_writer(cache)

    def _select_rows(self, images: str) -> None:
        """Set rows, images and dropped_images: the split's rows, by the images rule, then the limit."""
        if images not in IMAGE_RULES:
            raise InputError(f"images: expected one of {', '.join(IMAGE_RULES)}, got {images!r}")
        in_split = [r for r in self.meta.records if self.split is None or r.split == self.split]
        rows = [r.index for r in in_split if images == "all" or has_selected_data(r, self.categories)]
        self.images = images
        self.dropped_images = len(in_split) - len(rows)
        if self.dropped_images:
            log.info("%s: %d of %d images have no data in the categories %s and are left out (images=%r)",
                     self.root, self.dropped_images, len(in_split), self.categories, images)
        self.rows: np.ndarray = np.asarray(rows[:self.limit] if self.limit is not None else rows, dtype=np.int64)

    def with_images(self, images: str) -> "BrodenDataset":
        """This dataset (same categories, split, limit and cache) with rows chosen by another images rule."""
        if images == self.images:
            return self
        other = copy.copy(self)  # without the cache writer (__getstate__): its slots are positions in our rows
        other._select_rows(images)
        return other

    @property
    def fingerprint(self) -> str:
        """The source fingerprint in this dataset's mode (computed once; BrodenFormatError for a missing file)."""
        if self._fingerprint is None:
            self._fingerprint = cache_mod.source_fingerprint(self.root, self.meta, self.fingerprint_mode,
                                                             progress=True)
        return self._fingerprint

    def _open_cache(self, cache: str | Path, rebuild: bool = False,
                    write: bool = False) -> cache_mod.DecodedCache | None:
        if isinstance(cache, str) and cache == "off":
            return None
        if rebuild:
            log.info("rebuild: not reading any decoded cache of %s", self.root)
            return None
        if isinstance(cache, str) and cache == "auto":
            found = self._lookup(None)
        else:
            path = Path(cache)
            if (path / "meta.json").is_file():
                found = cache_mod.open_decoded(path, self.root, meta=self.meta, fingerprint=self._try_fingerprint())
                if found is None:
                    raise InputError(f"cache: {path} is not a fresh decoded cache of {self.root} "
                                     f"(source changed or build incomplete); rebuild it or pass cache='auto'")
            else:
                if not path.is_dir() and not write:
                    log.warning("cache: %s does not exist; decoding on the fly", path)
                found = self._lookup(path)
        if found is not None:
            log.info("reading decoded cache %s", found.path)
        elif not write:
            log.info("no decoded cache for %s: decoding images and PNGs on the fly", self.root)
        return found

    def _try_fingerprint(self) -> str | None:
        """The fingerprint, or None when a file is missing (decoding then names it)."""
        try:
            return self.fingerprint
        except BrodenFormatError as e:
            log.debug("no cache lookup for %s: %s", self.root, e)
            return None

    def _lookup(self, cache_dir: Path | None) -> cache_mod.DecodedCache | None:
        fingerprint = self._try_fingerprint()
        if fingerprint is None:
            return None
        return cache_mod.open_cache(self.root, cache_dir, self.meta, self.fingerprint_mode, fingerprint)

    def _start_writer(self, cache: str | Path) -> None:
        """Stage the selection's rows in a cache writer under the cache dir (see write_cache)."""
        if isinstance(cache, str) and cache == "auto":
            base = cache_mod.default_cache_dir() / "decoded"
        elif (Path(cache) / "meta.json").is_file():
            return  # a decoded cache named directly is read, never rewritten
        else:
            base = Path(cache) / "decoded"
        fingerprint = self._try_fingerprint()
        if fingerprint is None or not len(self):
            return
        try:
            if base.is_dir():
                cache_mod.remove_stale_builds(base, fingerprint)
            purpose = "cache-build" if len(self) == self.meta.num_images else "cache-scratch"
            writer = CacheWriter(self.meta, self.rows, base, fingerprint, self.fingerprint_mode, purpose)
        except CacheSpaceError as e:
            log.warning("%s. Running without the decoded cache: images and PNGs are decoded on every pass", e)
            return
        except (BrodenFormatError, OSError) as e:  # sizes differ (batches name the rows), or an unwritable dir
            log.warning("cannot stage a decoded cache of %s (%s): decoding on the fly", self.root, e)
            return
        self._writer = writer
        self._finalizer = weakref.finalize(self, writer.discard)  # also at exit: no scratch left behind
        log.info("decoding %s once, into %s (%s)", self.root, writer.tmp,
                 "the decoded cache, once every row is read" if writer.persistent else "a scratch store for this run")

    def close(self) -> None:
        """Remove an unfinished staging cache (a finished cache stays); reading goes on by decoding."""
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.discard()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def __enter__(self) -> "BrodenDataset":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers: no writer, lock or finalizer (they decode, or read a finished cache)
        state = dict(self.__dict__)
        state.update(_writer=None, _finalizer=None, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.rows.size)

    def record(self, i: int) -> ImageRecord:
        """The index.csv record of dataset item `i`."""
        return self.meta.records[int(self.rows[i])]

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} items")
        row = int(self.rows[i])
        if self.cache is not None:
            return self._cached_item(row)
        return self._decoded_item(row)

    def _decoded_item(self, row: int) -> dict[str, Any]:
        record = self.meta.records[row]
        if self._known is None:
            self._known = known_id_table(self.meta)
        planes = [_decode_plane(self.meta, record, p, self._known)
                  for c in self.categories for p in record.layers.get(c, [])]
        labels = (torch.from_numpy(np.stack(planes)) if planes
                  else torch.zeros((0, record.sh, record.sw), dtype=torch.int32))  # (K, sh, sw)
        ids = [n for c in self.categories for n in record.image_labels.get(c, [])]
        return {
            "index": row,
            "image": _decode_image(self.meta, record),
            "labels": labels,
            "image_labels": torch.tensor(ids, dtype=torch.int64),
        }

    def _cached_item(self, row: int) -> dict[str, Any]:
        batch = self._cached_batch(np.array([row], dtype=np.int64))  # one row: no padding
        return {"index": row, "image": batch["image"][0], "labels": batch["labels"][0],
                "image_labels": batch["image_labels"][0]}

    def _cached_batch(self, rows: np.ndarray, store: Any = None, slots: np.ndarray | None = None
                      ) -> dict[str, torch.Tensor]:
        """The batch of index rows `rows` sliced from `store` (default the cache) at `slots` (default rows)."""
        c = store if store is not None else self.cache
        at = rows if slots is None else slots
        b = rows.size
        flat, item, pos, kmax = _ragged_select(c.plane_offsets, c.plane_category, at, self._keep_category)
        sh, sw = c.label_shape
        labels = np.zeros((b, kmax, sh, sw), dtype=np.int32)  # (B, Kmax, sh, sw)
        if flat.size:
            labels[item, pos] = _take(c.planes, flat)
        flat, item, pos, mmax = _ragged_select(c.image_label_offsets, c.image_label_category, at,
                                               self._keep_category)
        image_labels = np.zeros((b, mmax), dtype=np.int64)  # (B, Mmax)
        if flat.size:
            image_labels[item, pos] = c.image_labels[flat]
        return {
            "index": torch.from_numpy(rows.astype(np.int64, copy=True)),
            "image": torch.from_numpy(_take(c.images, at)),  # (B, 3, H, W)
            "labels": torch.from_numpy(labels),
            "image_labels": torch.from_numpy(image_labels),
        }

    def get_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The batch `collate([self[i] for i in indices])`, sliced straight from the cache when there is one."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            raise InputError("get_batch: no indices")
        n = len(self)
        if idx.min() < -n or idx.max() >= n:
            raise IndexError(f"get_batch: indices out of range for {n} items")
        idx = np.where(idx < 0, idx + n, idx)
        writer = self._writer
        if self.cache is None and writer is not None:
            return self._staged_batch(writer, idx)
        if self.cache is None:
            return self._decoded_batch(idx)
        return self._cached_batch(self.rows[idx])

    def _staged_batch(self, writer: CacheWriter, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Decode the rows the writer lacks (once), write them, and slice the batch from its arrays."""
        arrays: CacheArrays | None = writer.arrays  # held here: finishing elsewhere leaves these maps valid
        if arrays is None:  # finished or closed meanwhile
            return self._cached_batch(self.rows[idx]) if self.cache is not None else self._decoded_batch(idx)
        todo = idx[~writer.written[idx]]
        if todo.size:
            if self._known is None:
                self._known = known_id_table(self.meta)
            for i in todo:
                # every category's planes: the cache holds them all, whatever this dataset selects
                image, planes = cache_mod._decode_record(self.meta, self.meta.records[int(self.rows[i])],
                                                         self._known)
                writer.write(int(i), image, planes)
        batch = self._cached_batch(self.rows[idx], arrays, idx)
        if writer.persistent and writer.complete:
            self._finish(writer)
        return batch

    def _decoded_batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        # the index's sizes first: an error then names index.csv and the row, before any decoding
        check_uniform_sizes(self.meta, self.rows[idx], "a batch")
        return collate([self[int(i)] for i in idx])

    def _finish(self, writer: CacheWriter) -> None:
        """The writer holds every row: make it the decoded cache and read that from now on."""
        with self._lock:
            if self._writer is not writer:
                return  # another thread finished it
            try:
                path = writer.finish(replace=self._rebuild)
            except OSError as e:  # e.g. the rename failed: keep reading the staging arrays
                log.warning("could not complete the decoded cache of %s (%s); it stays a scratch store", self.root, e)
                writer.persistent = False
                return
            found = cache_mod.open_decoded(path, self.root, self.meta, self.fingerprint)
            if found is None:
                log.warning("decoded cache %s did not open after its build; reading the staging arrays", path)
                return
            self.cache = found
            self._writer = None
            writer.discard()
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
        log.info("reading decoded cache %s", found.path)
