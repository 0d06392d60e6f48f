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

`mask_pixels` yields the on-pixels of `upsample(acts) > T` without computing
the dense maps: bit for bit the same pixels (see the comment above it), at a
cost that follows the few source cells near or above the threshold.

`mask_pixels(..., mode="pil")` instead reproduces the reference bit for bit:
PIL's own bilinear arithmetic (`dissect.pil_resample`), whose float32 maps
are compared with float64 thresholds as NetDissect-Lite compared them with
its float64 quantiles. (On a real fixture, 11 of 3,810 integer tally cells
differed between the two, by one pixel each.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from broden.errors import InputError
from dissect.config import UPSAMPLE_MODES  # declared beside the --upsample option
from dissect.pil_resample import pil_mask_pixels

__all__ = ["UPSAMPLE_MODES", "check_upsample_mode", "upsample", "mask_chunks", "threshold_masks",
           "mask_pixels"]


# Bilinear output is a convex combination of 4 inputs; float32 rounding can push
# it above the largest input by a few ulps of max|x|. Pairs are only pruned when
# their raw maximum lies further below the threshold than this (relative) margin.
_ROUNDING_MARGIN = 1e-5


def _check_inputs(acts: torch.Tensor, thresholds: torch.Tensor | None, size: tuple[int, int]) -> tuple[int, int]:
    """Validate (B, U, h, w) activations, (U,) thresholds (when given) and the output size; return (sh, sw)."""
    if acts.dim() != 4:
        raise InputError(f"activations must be (B, U, h, w), got shape {tuple(acts.shape)}")
    u = acts.shape[1]
    if thresholds is not None and thresholds.shape != (u,):
        raise InputError(f"thresholds must have shape ({u},) to match the activations' units, "
                         f"got {tuple(thresholds.shape)}")
    if len(size) != 2 or any(int(s) != s or int(s) < 1 for s in size):
        raise InputError(f"upsample size must be two positive ints (sh, sw), got {size!r}")
    return int(size[0]), int(size[1])


def check_upsample_mode(mode: str, option: str = "mode") -> str:
    """Return `mode` if it is one of UPSAMPLE_MODES, else raise InputError naming `option`."""
    if mode not in UPSAMPLE_MODES:
        raise InputError(f"{option} must be one of {', '.join(UPSAMPLE_MODES)}, got {mode!r}")
    return mode


def upsample(acts: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (half-pixel centres) resize of (B, U, h, w) maps to (B, U, sh, sw), in float32."""
    size = _check_inputs(acts, None, size)
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
    sh, sw = _check_inputs(acts, thresholds, size)
    b, u, h, w = acts.shape
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
    sh, sw = _check_inputs(acts, thresholds, size)
    b, u = acts.shape[:2]
    out = torch.zeros(b * u, sh, sw, dtype=torch.bool, device=acts.device)
    for rows, masks in mask_chunks(acts, thresholds, (sh, sw), max_elements):
        out[rows] = masks
    return out.view(b, u, sh, sw)


# ---------------------------------------------------------------- sparse masks
#
# Why it is exact. An output pixel blends the 2x2 "cell" of sources at rows
# (i0, i1) and cols (j0, j1) with weights in [0, 1] summing to 1 (up to an
# ulp). With m the cell's largest source, rounding is monotone, so the float32
# result (any operation order, with or without FMA) is <= m + 1e-6 * |m|.
# Hence a pixel can be on only when some source of its cell exceeds
# T - 2e-5 * |T| (a "hot" source): the cell of a pixel is then a candidate.
# Candidate pixels are evaluated with PyTorch's own float32 weights (read
# back from F.interpolate), which agrees with F.interpolate within a few ulps
# of the cell's largest |source|; pixels within 1e-5 of that of T are
# ambiguous and are decided by F.interpolate itself on their maps.

_HOT_MARGIN = 2e-5    # relative to |T|; rounding needs at most 1e-6
_AMBIGUOUS = 1e-5     # relative to the cell's max |source|; disagreement is at most ~1.2e-6


@dataclass(frozen=True)
class _Axis:
    """One axis of the resize, grouped by source cell: cell i blends sources i and i + step[i]."""
    step: torch.Tensor   # (n_in,) int64: 1, or 0 at the last source (torch clamps i1 there)
    dst: torch.Tensor    # (n_in, R) int64: output indices whose floor-source is i (padded)
    w0: torch.Tensor     # (n_in, R) float32 weight of source i; NaN in padding slots
    w1: torch.Tensor     # (n_in, R) float32 weight of source i + step[i]; NaN in padding slots


_AXES: dict[tuple[int, int, str], _Axis] = {}


def _axis(n_in: int, n_out: int, device: torch.device) -> _Axis:
    key = (n_in, n_out, str(device))
    if key in _AXES:
        return _AXES[key]
    # Read the weights back from F.interpolate on this device: one-hot rows in, one output
    # column (a 1 -> 1 copy along width), so each output is exactly a torch weight.
    eye = torch.eye(n_in, dtype=torch.float32, device=device).view(1, n_in, n_in, 1)
    wt = F.interpolate(eye, size=(n_out, 1), mode="bilinear", align_corners=False)[0, :, :, 0].t()  # (n_out, n_in)
    i0 = (wt > 0).to(torch.uint8).argmax(dim=1)  # (n_out,) first source with weight: the floor index
    step = (torch.arange(n_in, device=device) < n_in - 1).long()  # (n_in,)
    rows = torch.arange(n_out, device=device)
    w0 = wt[rows, i0]
    w1 = torch.where(step[i0] > 0, wt[rows, (i0 + 1).clamp(max=n_in - 1)], torch.zeros_like(w0))
    count = torch.bincount(i0, minlength=n_in)  # (n_in,) outputs per cell, ascending in output index
    start = torch.cumsum(count, 0) - count
    r = int(count.max())
    slot = torch.arange(r, device=device)
    valid = slot[None, :] < count[:, None]  # (n_in, R)
    dst = (start[:, None] + slot[None, :]).clamp(max=n_out - 1)
    nan = torch.full_like(w0[dst], math.nan)  # NaN weights make padding slots compare False
    axis = _Axis(step=step, dst=dst, w0=torch.where(valid, w0[dst], nan), w1=torch.where(valid, w1[dst], nan))
    _AXES[key] = axis
    return axis


def mask_pixels(acts: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int],
                max_elements: int = 1 << 23, mode: str = "torch") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (rows (n,), pix (n,)) int64: the on-pixels of `upsample(acts, size)[b, u] > thresholds[u]`.

    rows = b * U + u, pix = y * sw + x; every on-pixel is yielded exactly once
    (in no particular order), bit for bit the pixels of the dense expression.
    Only the output windows of source cells that hold a value near or above
    the threshold are computed (see the comment above), so the cost follows
    the number of such cells, not B * U * sh * sw. At most `max_elements`
    candidate output pixels are evaluated at a time.

    mode="pil" yields the pixels of `pil_bilinear(acts, size).double() >
    thresholds.double()` instead (float64 thresholds are not rounded to
    float32), as NetDissect-Lite compared PIL's maps with its float64
    quantiles; see `pil_resample.pil_mask_pixels`, exact by construction.
    """
    sh, sw = _check_inputs(acts, thresholds, size)
    check_upsample_mode(mode)
    b, u, h, w = acts.shape
    if acts.numel() == 0:
        return
    if mode == "pil":
        thr = thresholds.to(acts.device).repeat(b)  # (B*U,) one per map, float64 kept as it is
        yield from pil_mask_pixels(acts.reshape(b * u, h, w), thr, (sh, sw), max_elements)
        return
    dev = acts.device
    x = acts.float().contiguous()  # (B, U, h, w)
    thr = thresholds.to(device=dev, dtype=torch.float32)  # (U,)
    hot = x > (thr - _HOT_MARGIN * thr.abs()).view(1, u, 1, 1)  # (B, U, h, w)
    cell = hot.clone()  # cell (i, j) holds sources (i, j), (i, j+1), (i+1, j), (i+1, j+1), clamped
    cell[..., :-1] |= hot[..., 1:]
    cells = cell.clone()
    cells[..., :-1, :] |= cell[..., 1:, :]
    del hot, cell
    idx = torch.nonzero(cells.view(-1)).squeeze(1)  # (n_c,) flat (b*U + u)*h*w + i*w + j
    del cells
    if idx.numel() == 0:
        return
    ay, ax = _axis(h, sh, dev), _axis(w, sw, dev)
    hw = h * w
    ij = idx % hw
    ci, cj = torch.div(ij, w, rounding_mode="floor"), ij % w
    dx, dy = ax.step.index_select(0, cj), ay.step.index_select(0, ci) * w
    flat = x.view(-1)
    # index_select, not x[idx]: several times faster on CPU for 1-D gathers
    src = torch.stack([flat.index_select(0, idx), flat.index_select(0, idx + dx),
                       flat.index_select(0, idx + dy), flat.index_select(0, idx + dy + dx)])  # (4, n_c)
    mag = src.abs().amax(dim=0)  # (n_c,)
    if not bool(torch.isfinite(mag).all()):
        # inf/NaN sources: the error bounds do not hold; the dense expression decides
        for rows, masks in mask_chunks(acts, thresholds, (sh, sw), max_elements):
            on = torch.nonzero(masks.reshape(-1)).squeeze(1)
            yield rows[on // (sh * sw)], on % (sh * sw)
        return
    ry, rx = ay.dst.shape[1], ax.dst.shape[1]
    slots = ry * rx
    # output pixel index of (cell ij, slot r, slot c): one gather per on-pixel later
    pix_table = (ay.dst[:, None, :, None] * sw + ax.dst[None, :, None, :]).reshape(-1)  # (h*w*R*C,)
    wy0_flat, wy1_flat = ay.w0.reshape(-1), ay.w1.reshape(-1)  # (h*R,)
    bu = torch.div(idx, hw, rounding_mode="floor")
    t = thr.index_select(0, bu % u)
    lo_all = t - _AMBIGUOUS * mag  # (n_c,) below this a pixel is surely off: prune with it
    step = max(1, max_elements // slots)
    for s in range(0, idx.numel(), step):
        sl = slice(s, s + step)
        i, j = ci[sl], cj[sl]
        a, bb, c, d = src[:, sl]
        lo = lo_all[sl]
        wx0, wx1 = ax.w0.index_select(0, j), ax.w1.index_select(0, j)  # (n, C)
        t0 = a[:, None] * wx0 + bb[:, None] * wx1  # (n, C) blend along width, as torch does first
        t1 = c[:, None] * wx0 + d[:, None] * wx1
        wy0, wy1 = ay.w0.index_select(0, i), ay.w1.index_select(0, i)  # (n, R)
        # Exactly, a pixel is a convex blend of its column's (t0, t1) and of its row's ends,
        # so it is at most the smaller of the two maxima: prune rows and columns first.
        col_ok = torch.maximum(t0, t1) > lo[:, None]  # (n, C); NaN padding is False
        row_ok = torch.maximum(a[:, None] * wy0 + c[:, None] * wy1,
                               bb[:, None] * wy0 + d[:, None] * wy1) > lo[:, None]  # (n, R)
        # surviving rows, then the surviving columns of each: (cell, r, c) without an (n, R, C) pass
        pair = torch.nonzero(row_ok.view(-1)).squeeze(1)  # (m,) flat cell * R + r
        cand = torch.nonzero(col_ok.index_select(0, torch.div(pair, ry, rounding_mode="floor"))
                             .view(-1)).squeeze(1)  # (k,) flat pair * C + c
        pr = torch.div(cand, rx, rounding_mode="floor")
        col = cand - pr * rx
        at_row = pair.index_select(0, pr)  # (k,) cell * R + r
        cell_of = torch.div(at_row, ry, rounding_mode="floor")
        r = at_row - cell_of * ry
        rc = r * rx + col
        at_col = cell_of * rx + col
        at_row = i.index_select(0, cell_of) * ry + r
        v = (t0.view(-1).index_select(0, at_col) * wy0_flat.index_select(0, at_row)
             + t1.view(-1).index_select(0, at_col) * wy1_flat.index_select(0, at_row))  # (k,)
        cell_of += s
        tol = _AMBIGUOUS * mag.index_select(0, cell_of)
        diff = v - t.index_select(0, cell_of)
        on = torch.nonzero(diff > tol).squeeze(1)
        pick = cell_of.index_select(0, on)
        yield (bu.index_select(0, pick),
               pix_table.index_select(0, ij.index_select(0, pick) * slots + rc.index_select(0, on)))
        amb = torch.nonzero(diff.abs_() <= tol).squeeze(1)
        if amb.numel():
            pick = cell_of.index_select(0, amb)
            pix = pix_table.index_select(0, ij.index_select(0, pick) * slots + rc.index_select(0, amb))
            yield _decide_densely(x, thr, (sh, sw), bu.index_select(0, pick), pix)


def _decide_densely(x: torch.Tensor, thr: torch.Tensor, size: tuple[int, int], rows: torch.Tensor,
                    pix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # F.interpolate on the few maps holding ambiguous pixels: the reference's own arithmetic
    b, u, h, w = x.shape
    maps, where = torch.unique(rows, return_inverse=True)
    up = F.interpolate(x.view(b * u, 1, h, w)[maps], size=size, mode="bilinear",
                       align_corners=False)  # (m, 1, sh, sw)
    on = up.view(maps.numel(), -1)[where, pix] > thr[rows % u]
    return rows[on], pix[on]
