"""The unit masks' on-pixels found by the tally, kept for the later passes over the same masks.

Stage 2 finds every on-pixel of every (image, unit) mask (`upsample.mask_pixels`,
the most expensive step after the forward). The label-strip pass and the mask
compactness of the top images need some of the same masks again; when the
activations are kept in memory and the pixels fit the memory left in the
budget, they are read from here instead of being found a second and third
time. The pixel sets are the same either way, so every result is identical;
when the store is over its limit it empties itself and the callers find the
pixels again.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

__all__ = ["MaskPixelStore"]

log = logging.getLogger(__name__)


class MaskPixelStore:
    """Per layer and batch, the (rows b*U + u, pix y*sw + x) on-pixels of one stage's masks.

    Filled batch by batch by one process holding the whole dataset (no shards):
    `begin_batch` names the batch's images and label size, `add` its pixels.
    `limit_bytes` bounds what it holds. Rows are stored as int32 and pixels as
    int16 where the label size allows (6 bytes a pixel).
    """

    def __init__(self, limit_bytes: int, batch_size: int, max_units: int) -> None:
        self.limit_bytes = int(limit_bytes)
        self.batch_size = int(batch_size)
        self.nbytes = 0
        self.usable = self.limit_bytes > 0 and self.batch_size * int(max_units) < 2 ** 31  # rows fit int32
        self._pieces: dict[tuple[str, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._images: dict[int, np.ndarray] = {}  # batch number -> its images' dataset indices (B,)
        self._sizes: dict[int, tuple[int, int]] = {}  # batch number -> label size (sh, sw)
        self._where: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # see _locate

    def begin_batch(self, batch: int, index: torch.Tensor, size: tuple[int, int]) -> None:
        """Batch number `batch` holds the images `index` (B,) (their dataset indices) at label `size`."""
        if not self.usable:
            return
        if index.numel() > self.batch_size:
            return self._drop(f"batch {batch} holds {index.numel()} images, more than {self.batch_size}")
        self._images[batch] = index.detach().cpu().numpy().astype(np.int64)
        self._sizes[batch] = (int(size[0]), int(size[1]))
        self._where = None

    def add(self, layer: str, batch: int, rows: torch.Tensor, pix: torch.Tensor) -> None:
        """Keep the on-pixels `rows`, `pix` (n,) of `layer`'s masks in batch number `batch`."""
        if not self.usable:
            return
        if batch not in self._sizes:
            return self._drop(f"pixels of batch {batch} came before its images")
        sh, sw = self._sizes[batch]
        piece = (rows.to(torch.int32), pix.to(torch.int16 if sh * sw <= 2 ** 15 else torch.int32))
        self.nbytes += sum(t.numel() * t.element_size() for t in piece)
        if self.nbytes > self.limit_bytes:
            return self._drop(f"the masks' pixels need more than the {self.limit_bytes / 2 ** 20:.0f} MiB left "
                              f"in the activation budget")
        self._pieces.setdefault((layer, batch), []).append(piece)

    def _drop(self, why: str) -> None:
        log.info("mask pixels not kept between stages (%s): the later passes find them again", why)
        self.usable = False
        self._pieces.clear()
        self._images.clear()
        self._sizes.clear()
        self._where = None
        self.nbytes = 0

    def pixels(self, layer: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, pix) int64 of `layer`'s masks in batch number `batch` (in the order they were added)."""
        parts = self._pieces.get((layer, batch), [])
        if not parts:
            empty = torch.zeros(0, dtype=torch.int64)
            return empty, empty.clone()
        return (torch.cat([r for r, _ in parts]).long(), torch.cat([p for _, p in parts]).long())

    def label_size(self) -> tuple[int, int] | None:
        """The one label size of every batch kept (None when empty or when batches differ)."""
        sizes = set(self._sizes.values())
        return next(iter(sizes)) if len(sizes) == 1 else None

    def top_pixels(self, layer: str, indices: np.ndarray, units: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(which, pix) of the masks (u, image indices[u, j]) as mask numbers u * k + j; None when not all are here.

        indices (U, k) are dataset indices (batch["index"]), as TopImages keeps them.
        """
        if not self.usable or indices.size == 0 or not self._images:
            return None
        u, k = indices.shape
        seen, batch_of, within_of = self._locate()
        at = np.searchsorted(seen, indices.ravel()).clip(max=seen.size - 1)
        if not np.array_equal(seen[at], indices.ravel()):
            return None  # an image the store never saw (or one it saw twice): find the pixels again
        batch, within = batch_of[at].reshape(u, k), within_of[at].reshape(u, k)
        which_out, pix_out = [], []
        for b in np.unique(batch):
            sel = np.nonzero(batch == b)  # (unit, slot) pairs whose image is in this batch
            rows, pix = self.pixels(layer, int(b))
            mask_of_row = torch.full((self.batch_size * units,), -1, dtype=torch.int64, device=rows.device)
            mask_of_row[torch.from_numpy(within[sel] * units + sel[0]).to(rows.device)] = \
                torch.from_numpy(sel[0] * k + sel[1]).to(rows.device)
            mask = mask_of_row[rows]
            on = mask >= 0
            which_out.append(mask[on].cpu().numpy())
            pix_out.append(pix[on].cpu().numpy())
        return np.concatenate(which_out), np.concatenate(pix_out)

    def _locate(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image indices sorted, their batch numbers, their slots): built once for every layer's lookups.

        An image seen twice is left out, so a lookup of it fails (its batch would be ambiguous).
        """
        if self._where is None:
            numbers = sorted(self._images)
            seen = np.concatenate([self._images[b] for b in numbers])
            batch_of = np.concatenate([np.full(len(self._images[b]), b) for b in numbers])
            within_of = np.concatenate([np.arange(len(self._images[b])) for b in numbers])
            order = np.argsort(seen, kind="stable")
            seen, batch_of, within_of = seen[order], batch_of[order], within_of[order]
            once = np.ones(seen.size, dtype=bool)
            once[1:] = seen[1:] != seen[:-1]
            once[:-1] &= seen[:-1] != seen[1:]
            self._where = (seen[once], batch_of[once], within_of[once])
        return self._where
