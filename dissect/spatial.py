"""How compact a unit's masks are: connected components and spatial spread over its top images.

The CGL paper's spatial loss L_s claims to concentrate each unit's activation in one connected
region. This measures it on the dissection's own masks (the same `upsample(map) > T_k` masks
that the IoU counts, at label resolution) for each unit's top-k images:

- components: the number of connected regions of the mask (scikit-image's `measure.label`;
  connectivity 2 = 8-neighbour by default, an option);
- spread: mean distance of the mask's pixels from their centroid, in units of the label map's
  longer side (L_s's own form, with coordinates normalised as `--spatial-coords normalized`).

Per unit: the mean over its top images whose mask is not empty (NaN when all are empty).
Per layer: the mean over units with a value, and over detector units.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from skimage import measure

from broden.errors import InputError
from dissect.upsample import mask_pixels

__all__ = ["MaskStats", "MaskPixels", "top_image_masks", "top_image_pixels", "mask_shape_stats",
           "pixel_shape_stats", "layer_spatial_summary", "CONNECTIVITIES"]

CONNECTIVITIES = (1, 2)


@dataclass
class MaskStats:
    """Per (unit, top image): components (int64, 0 for an empty mask), spread (float64, NaN if empty), area."""

    components: np.ndarray  # (U, k)
    spread: np.ndarray      # (U, k)
    area: np.ndarray        # (U, k) pixels on

    def per_unit(self) -> tuple[np.ndarray, np.ndarray]:
        """(components (U,), spread (U,)): means over each unit's non-empty masks, NaN when none."""
        nonempty = self.area > 0
        n = nonempty.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            comp = np.where(n > 0, (self.components * nonempty).sum(axis=1) / n, np.nan)
            spread = np.where(n > 0, np.where(nonempty, self.spread, 0.0).sum(axis=1) / n, np.nan)
        return comp, spread


def top_image_masks(maps: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int],
                    upsample: str = "torch") -> torch.Tensor:
    """Masks (U, k, sh, sw) bool of top maps (U, k, h, w): exactly the dissection's `up > T_u` pixels."""
    u, k, _, _ = maps.shape
    sh, sw = size
    px = top_image_pixels(maps, thresholds, size, upsample)
    flat = torch.zeros(u * k, sh * sw, dtype=torch.bool, device=maps.device)
    flat[torch.from_numpy(px.which).to(maps.device), torch.from_numpy(px.ys * sw + px.xs).to(maps.device)] = True
    return flat.view(u, k, sh, sw)


def top_image_pixels(maps: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int],
                     upsample: str = "torch") -> "MaskPixels":
    """The on-pixels of top maps (U, k, h, w) thresholded at `size`: exactly the dissection's `up > T_u` pixels."""
    u, k, h, w = maps.shape
    sh, sw = size
    # the U * k maps as the "units" of one image: mask_pixels' rows are then mask indices u * k + j
    parts = list(mask_pixels(maps.reshape(1, u * k, h, w), thresholds.repeat_interleave(k), (sh, sw),
                             mode=upsample))
    which = torch.cat([r for r, _ in parts]).cpu() if parts else torch.zeros(0, dtype=torch.int64)
    pix = torch.cat([p for _, p in parts]).cpu() if parts else torch.zeros(0, dtype=torch.int64)
    return MaskPixels.of(which.numpy(), (pix // sw).numpy(), (pix % sw).numpy(), (u, k, sh, sw))


@dataclass
class MaskPixels:
    """The on-pixels of (U, k) masks of (H, W): mask index u * k + j, row y, column x, in row-major order."""

    which: np.ndarray  # (m,) int64
    ys: np.ndarray     # (m,) int64
    xs: np.ndarray     # (m,) int64
    shape: tuple[int, int, int, int]  # (U, k, H, W)

    @classmethod
    def of(cls, which: np.ndarray, ys: np.ndarray, xs: np.ndarray, shape: tuple[int, int, int, int]) -> "MaskPixels":
        """From pixels in any order, each once: sorted to (mask, y, x) order, the order of np.nonzero,
        so float sums over them (centroids, spread) are the same bit for bit however they were found."""
        _, _, hh, ww = shape
        key = np.sort((np.asarray(which, np.int64) * hh + np.asarray(ys, np.int64)) * ww + np.asarray(xs, np.int64))
        rest, xs = np.divmod(key, ww)
        which, ys = np.divmod(rest, hh)
        return cls(which, ys, xs, tuple(int(v) for v in shape))


def _components(px: MaskPixels, connectivity: int) -> np.ndarray:
    """Connected components of each of the U * k masks with one scikit-image call.

    The masks are stacked vertically with an empty row between them, so no region (even with
    diagonal neighbours) can join two masks. Runs of empty rows are collapsed to one (still
    apart under either connectivity, never joined), so the call's cost follows the rows that
    hold pixels; each region's mask is that of any of its pixels.
    """
    u, k, hh, ww = px.shape
    n = u * k
    if px.which.size == 0:
        return np.zeros(n, dtype=np.int64)
    tall_row = px.which * (hh + 1) + px.ys  # row in the stack of (hh + 1)-row masks
    nonempty = np.zeros(n * (hh + 1), dtype=bool)
    nonempty[tall_row] = True
    keep = nonempty.copy()
    keep[1:] |= nonempty[:-1]  # a row with pixels, and the empty row after it
    at = np.cumsum(keep) - 1  # row in the collapsed stack
    stack = np.zeros((int(at[-1]) + 1, ww), dtype=bool)
    rows = at[tall_row]
    stack[rows, px.xs] = True
    labels, count = measure.label(stack, connectivity=connectivity, background=0, return_num=True)
    owner = np.zeros(count + 1, dtype=np.int64)
    owner[labels[rows, px.xs]] = px.which
    return np.bincount(owner[1:], minlength=n).astype(np.int64)


def pixel_shape_stats(px: MaskPixels, connectivity: int = 2) -> MaskStats:
    """Components, spread and area of the masks whose on-pixels `px` lists (see the module doc)."""
    if connectivity not in CONNECTIVITIES:
        raise InputError(f"mask connectivity {connectivity!r}: expected 1 (4-neighbour) or 2 (8-neighbour)")
    u, k, hh, ww = px.shape
    n = u * k
    comp = _components(px, connectivity)
    which, ys, xs = px.which, px.ys, px.xs
    # over the pixels that are on only (masks are sparse: a top quantile), float64 sums per mask
    area = np.bincount(which, minlength=n).astype(np.float64)  # (n,)
    safe = np.maximum(area, 1.0)
    cy = np.bincount(which, weights=ys, minlength=n) / safe
    cx = np.bincount(which, weights=xs, minlength=n) / safe
    dist = np.hypot(ys - cy[which], xs - cx[which])
    spread = np.bincount(which, weights=dist, minlength=n) / safe / max(hh, ww)
    spread = np.where(area > 0, spread, np.nan)
    return MaskStats(components=comp.reshape(u, k), spread=spread.reshape(u, k),
                     area=area.astype(np.int64).reshape(u, k))


def mask_shape_stats(masks: torch.Tensor, connectivity: int = 2) -> MaskStats:
    """Components, spread and area of bool masks (U, k, H, W) (see the module doc for the definitions)."""
    u, k, hh, ww = masks.shape
    which, ys, xs = np.nonzero(masks.reshape(u * k, hh, ww).cpu().numpy())  # row-major: (mask, y, x) order
    return pixel_shape_stats(MaskPixels(which.astype(np.int64), ys.astype(np.int64), xs.astype(np.int64),
                                        (u, k, hh, ww)), connectivity)


def layer_spatial_summary(components: np.ndarray, spread: np.ndarray, detector: np.ndarray) -> dict:
    """summary.json's per-layer 'spatial' block: means over units with masks, and over detectors."""
    def block(sel: np.ndarray) -> dict:
        ok = sel & ~np.isnan(components)
        n = int(ok.sum())
        return {"units": n, "components": float(components[ok].mean()) if n else None,
                "spread": float(spread[ok].mean()) if n else None}

    return {**block(np.ones_like(detector, dtype=bool)), "detectors": block(np.asarray(detector, dtype=bool))}
