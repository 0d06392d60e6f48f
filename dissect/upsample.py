"""Activation maps to label resolution, and thresholded unit masks (netdissect.md section 2, step 3).

Upsampling is bilinear with half-pixel centres (`align_corners=False`). For
UPscaling it equals PIL's `Image.BILINEAR` resize of a float ('F') image,
which is what the reference's `scipy.misc.imresize(x, size, mode='F')` ran,
to within float32 rounding: |diff| <= 2e-6 * max|x| (torch accumulates in
float32, PIL in double); tests/test_upsample.py checks 2x, 13 -> 112 and odd
non-square factors. Rounding also means a map that is constant at exactly T
can come out a hair above or below T. For DOWNscaling PIL antialiases (its
filter widens with the scale) while this does not; Broden label maps are at
least as large as the activation maps we dissect.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from broden.errors import InputError

__all__ = ["upsample", "mask_chunks", "threshold_masks"]

# Bilinear output is a convex combination of 4 inputs; float32 rounding can push
# it above the largest input by a few ulps of max|x|. Pairs are only pruned when
# their raw maximum lies further below the threshold than this (relative) margin.
_ROUNDING_MARGIN = 1e-5


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    if len(size) != 2 or any(int(s) != s or int(s) < 1 for s in size):
        raise InputError(f"upsample size must be two positive ints (sh, sw), got {size!r}")
    return int(size[0]), int(size[1])


def upsample(acts: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (half-pixel centres) resize of (B, U, h, w) maps to (B, U, sh, sw), in float32."""
    if acts.dim() != 4:
        raise InputError(f"activations must be (B, U, h, w), got shape {tuple(acts.shape)}")
    size = _check_size(size)
    return F.interpolate(acts.float(), size=size, mode="bilinear", align_corners=False)


def mask_chunks(acts: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int],
                max_elements: int = 1 << 24) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (rows (n,) int64 indices b*U + u, masks (n, sh, sw) bool) for the maps that can fire.

    A mask is `upsample(acts, size)[b, u] > thresholds[u]`. Maps whose raw
    maximum lies below the threshold (by more than float32 rounding can
    bridge) have empty masks and are skipped; bilinear output never exceeds
    its largest input otherwise. At most `max_elements` float32 values are
    upsampled at a time.
    """
    if acts.dim() != 4:
        raise InputError(f"activations must be (B, U, h, w), got shape {tuple(acts.shape)}")
    b, u, h, w = acts.shape
    if thresholds.shape != (u,):
        raise InputError(f"thresholds must have shape ({u},) to match the activations' units, "
                         f"got {tuple(thresholds.shape)}")
    sh, sw = _check_size(size)
    if acts.numel() == 0:
        return
    flat = acts.reshape(b * u, h, w)  # (B*U, h, w)
    thr = thresholds.to(device=acts.device, dtype=torch.float32).repeat(b)  # (B*U,)
    amax = flat.amax(dim=(1, 2)).float()
    reach = flat.abs().amax(dim=(1, 2)).float() * _ROUNDING_MARGIN
    active = torch.nonzero(amax + reach > thr).squeeze(1)  # (n,)
    step = max(1, max_elements // (sh * sw))
    for start in range(0, active.numel(), step):
        rows = active[start:start + step]
        up = F.interpolate(flat[rows].unsqueeze(1).float(), size=(sh, sw), mode="bilinear",
                           align_corners=False)  # (n, 1, sh, sw)
        yield rows, up.squeeze(1) > thr[rows].view(-1, 1, 1)


def threshold_masks(acts: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int],
                    max_elements: int = 1 << 24) -> torch.Tensor:
    """Unit masks `upsample(acts, size) > thresholds[u]` as a bool (B, U, sh, sw) tensor.

    Equal to the dense expression, but only maps that can fire are upsampled
    (see `mask_chunks`), so the full (B, U, sh, sw) float copy is never made.
    `IoUTally.add_activations` skips even the dense bool result.
    """
    if acts.dim() != 4:
        raise InputError(f"activations must be (B, U, h, w), got shape {tuple(acts.shape)}")
    b, u = acts.shape[:2]
    sh, sw = _check_size(size)
    out = torch.zeros(b * u, sh, sw, dtype=torch.bool, device=acts.device)
    for rows, masks in mask_chunks(acts, thresholds, (sh, sw), max_elements):
        out[rows] = masks
    return out.view(b, u, sh, sw)
