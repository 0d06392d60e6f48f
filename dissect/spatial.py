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

__all__ = ["MaskStats", "top_image_masks", "mask_shape_stats", "layer_spatial_summary", "CONNECTIVITIES"]

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
    u, k, h, w = maps.shape
    sh, sw = size
    acts = maps.transpose(0, 1).contiguous()  # (k, U, h, w): rows of mask_pixels are b * U + u
    flat = torch.zeros(k * u, sh * sw, dtype=torch.bool, device=maps.device)
    for rows, pix in mask_pixels(acts, thresholds, (sh, sw), mode=upsample):
        flat[rows, pix] = True
    return flat.view(k, u, sh, sw).transpose(0, 1)


def _components(masks: np.ndarray, connectivity: int) -> np.ndarray:
    """Connected components of each of n masks (n, H, W) with one scikit-image call.

    The masks are stacked vertically with an empty row between them, so no region (even with
    diagonal neighbours) can join two masks; each region's mask is that of its first pixel.
    """
    n, hh, ww = masks.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    tall = np.zeros((n, hh + 1, ww), dtype=bool)
    tall[:, :hh] = masks
    labels, count = measure.label(tall.reshape(n * (hh + 1), ww), connectivity=connectivity, background=0,
                                  return_num=True)
    flat = labels.ravel()
    on = np.flatnonzero(flat)
    # every pixel of a region lies in one mask, so any of them names its owner (no sort needed)
    owner = np.zeros(count + 1, dtype=np.int64)
    owner[flat[on]] = on // ((hh + 1) * ww)
    return np.bincount(owner[1:], minlength=n).astype(np.int64)


def mask_shape_stats(masks: torch.Tensor, connectivity: int = 2) -> MaskStats:
    """Components, spread and area of bool masks (U, k, H, W) (see the module doc for the definitions)."""
    if connectivity not in CONNECTIVITIES:
        raise InputError(f"mask connectivity {connectivity!r}: expected 1 (4-neighbour) or 2 (8-neighbour)")
    u, k, hh, ww = masks.shape
    m = masks.reshape(u * k, hh, ww)
    flat = m.cpu().numpy()
    comp = _components(flat, connectivity)
    # over the pixels that are on only (masks are sparse: a top quantile), float64 sums per mask
    which, ys, xs = np.nonzero(flat)
    n = u * k
    area = np.bincount(which, minlength=n).astype(np.float64)  # (n,)
    safe = np.maximum(area, 1.0)
    cy = np.bincount(which, weights=ys, minlength=n) / safe
    cx = np.bincount(which, weights=xs, minlength=n) / safe
    dist = np.hypot(ys - cy[which], xs - cx[which])
    spread = np.bincount(which, weights=dist, minlength=n) / safe / max(hh, ww)
    spread = np.where(area > 0, spread, np.nan)
    return MaskStats(components=comp.reshape(u, k), spread=spread.reshape(u, k),
                     area=area.astype(np.int64).reshape(u, k))


def layer_spatial_summary(components: np.ndarray, spread: np.ndarray, detector: np.ndarray) -> dict:
    """summary.json's per-layer 'spatial' block: means over units with masks, and over detectors."""
    def block(sel: np.ndarray) -> dict:
        ok = sel & ~np.isnan(components)
        n = int(ok.sum())
        return {"units": n, "components": float(components[ok].mean()) if n else None,
                "spread": float(spread[ok].mean()) if n else None}

    return {**block(np.ones_like(detector, dtype=bool)), "detectors": block(np.asarray(detector, dtype=bool))}
