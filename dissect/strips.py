"""Drawing a unit's top images with its thresholded mask: the primitives reports and notebooks share.

The mask is the dissection's own (netdissect.md section 2, step 3): the unit's
map upsampled bilinearly (half-pixel centres) to the image's label size and
compared strictly with the unit's threshold; only that boolean mask is then
scaled to the tile, nearest-neighbour, so a pixel shown as active is one the
IoU counted. reports.thumbnails writes strips to disk with these;
dissect.views embeds them in notebooks.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["activation_masks", "scale_masks", "compose_tiles", "strip_image", "load_rgb", "OUTLINE_COLOR"]

log = logging.getLogger(__name__)

OUTLINE_COLOR = (255, 220, 0)
_GAP = 2  # pixels of white between the tiles of a strip


def activation_masks(maps: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Masks `bilinear_upsample(map) > threshold` at `size` = the label size (sh, sw), as the dissection.

    maps: (n, h, w) raw activation maps; thresholds: (n,) one per map. Returns (n, sh, sw) bool.
    """
    up = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)  # (n, 1, H, W)
    return up[:, 0] > thresholds.float()[:, None, None]


def scale_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize (pixel centres, 'nearest-exact') of bool masks (n, h, w) to (n, *size)."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks.bool()
    return F.interpolate(masks[:, None].float(), size=size, mode="nearest-exact")[:, 0] > 0.5


def _inner_boundary(mask: torch.Tensor) -> torch.Tensor:
    """Mask pixels with a 4-neighbour outside the mask (the image border counts as outside)."""
    padded = F.pad(mask[:, None].float(), (1, 1, 1, 1), value=0.0)[:, 0]  # (n, H+2, W+2)
    interior = (padded[:, :-2, 1:-1] * padded[:, 2:, 1:-1] * padded[:, 1:-1, :-2] * padded[:, 1:-1, 2:]) > 0
    return mask & ~interior


def compose_tiles(images: torch.Tensor, masks: torch.Tensor, height: int, dim: float = 0.2) -> np.ndarray:
    """Resize to `height`, dim pixels outside the mask to `dim`, outline the mask.

    images: (n, 3, H, W) uint8; masks: (n, mh, mw) bool at any size (the label size), scaled to the
    tile with `scale_masks`. Returns (n, th, tw, 3) uint8 tiles.
    """
    n, _, H, W = images.shape
    width = max(1, round(W * height / H))
    small = images.float()
    if (H, W) != (height, width):
        small = F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False,
                              antialias=True)  # (n, 3, th, tw)
    small_mask = scale_masks(masks, (height, width))  # (n, th, tw)
    small = small * torch.where(small_mask, 1.0, float(dim))[:, None]
    edge = _inner_boundary(small_mask)  # (n, th, tw)
    color = torch.tensor(OUTLINE_COLOR, dtype=small.dtype, device=small.device)[None, :, None, None]
    small = torch.where(edge[:, None], color, small)
    return small.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def strip_image(tiles: Sequence[np.ndarray]) -> Image.Image:
    """Tiles side by side on white, _GAP pixels apart, top-aligned."""
    height = max(t.shape[0] for t in tiles)
    width = sum(t.shape[1] for t in tiles) + _GAP * (len(tiles) - 1)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    x = 0
    for t in tiles:
        canvas[: t.shape[0], x: x + t.shape[1]] = t
        x += t.shape[1] + _GAP
    return Image.fromarray(canvas)


def load_rgb(path: Path) -> np.ndarray | None:
    """The image at `path` as (H, W, 3) uint8 RGB; None (logged) when it cannot be read."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        log.warning("cannot read %s: %s", path, e)
        return None
