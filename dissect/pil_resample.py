"""Pillow's BILINEAR resize of float32 ('F') images, bit for bit, on tensors.

NetDissect-Lite upsampled activation maps with `scipy.misc.imresize(x, size,
mode='F')`, i.e. `Image.fromarray(np.float32 map).resize((W, H),
Image.BILINEAR)`. Pillow (src/libImaging/Resample.c, `ImagingResampleInner`)
runs that as two separable passes over the full image (box (0, 0, w, h)):

1. horizontal: every used source row (`ybox_first..ybox_last`, the rows the
   vertical taps touch) is resized to the output width into a float32
   temporary image;
2. vertical: that temporary is resized to the output height.

Pillow 13 swaps the order (vertical first, on the columns the horizontal
taps touch) when the height shrinks by more than twice as many pixels as
the width: `H < h and h - H > 2 * (w - W)` (python-pillow/Pillow#9549; the
condition was inferred from Pillow 13.0.0's output on thousands of random
size pairs, its new C source not being at hand). Older Pillow always ran
horizontal first. Rounding the temporary to float32 makes the order
visible in the last bit; when the height grows (upscaling, the case of
Network Dissection) every version runs horizontal first. A pass whose axis
keeps its size is skipped (both skipped: a plain copy).
Each output value is `ss = 0.0; ss += src[xmin + k] * c[k]` for k in
0..count-1 in double precision, in that order, then rounded to float32.
The coefficients (`precompute_coeffs`), in double, with in/out the sizes:

    scale = in / out;  filterscale = max(scale, 1);  support = filterscale
    center = (o + 0.5) * scale
    xmin = max(0, trunc(center - support + 0.5))
    xmax = min(in, trunc(center + support + 0.5));  count = xmax - xmin
    c[k] = tri(((xmin + k) - center + 0.5) / filterscale), tri(d) = max(0, 1 - |d|)
           (the division is a multiplication by 1.0 / filterscale)
    c[k] /= sum(c[0..count-1]) (summed in order), unless that sum is 0

so downscaling widens the triangle by the scale (antialiasing). Here each
pass is a short loop over the taps (at most 2 * ceil(support) + 1; 3 when
upscaling), each tap one gather and a float64 multiply-add over the whole
batch, which reproduces every rounding step of Pillow's C loop: float32 ->
float64 is exact, and each float64 multiply and add is IEEE-rounded exactly
as in C (as separate operations: no fused multiply-add).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Iterator

import torch

from broden.errors import InputError

__all__ = ["pil_bilinear", "pil_mask_pixels"]


@dataclass(frozen=True)
class _Taps:
    """Pillow's coefficients for one axis: output o reads sources index[o, k] for k < count[o]."""
    index: torch.Tensor   # (n_out, K) int64 source index xmin + k; xmin + count - 1 in padding slots
    weight: torch.Tensor  # (n_out, K) float64 normalised coefficients; 0 in padding slots
    valid: torch.Tensor   # (n_out, K) bool: k < count (Pillow does not touch padding slots)
    used: tuple[bool, ...]  # per slot k: some output has k < count (host-side: no device sync)
    full: tuple[bool, ...]  # per slot k: every output has k < count
    first: int            # first source index any output reads
    last: int             # one past the last source index any output reads


_TAPS: dict[tuple[int, int, str], _Taps] = {}


def _bilinear_coeffs(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(xmin (n_out,) int64, count (n_out,) int64, weights (n_out, K) float64) as Pillow computes them."""
    # Pillow's box edges are C floats; n_in - 0 is exact there for any size it can allocate
    scale = float(n_in) / n_out
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # BILINEAR's support is 1
    ksize = int(math.ceil(support)) * 2 + 1
    inv = 1.0 / filterscale
    center = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale  # in0 = 0 adds nothing
    # C's (int) cast truncates toward zero; trunc and floor differ only on (-1, 0), clamped anyway
    xmin = torch.trunc(center - support + 0.5).long().clamp(min=0)
    xmax = torch.trunc(center + support + 0.5).long().clamp(max=n_in)
    count = xmax - xmin
    taps = torch.arange(ksize)
    d = (((xmin[:, None] + taps[None, :]).double() - center[:, None]) + 0.5) * inv  # (n_out, K)
    d = d.abs()
    w = torch.where(d < 1.0, 1.0 - d, torch.zeros_like(d))
    w = torch.where(taps[None, :] < count[:, None], w, torch.zeros_like(w))
    total = torch.zeros(n_out, dtype=torch.float64)
    for k in range(ksize):  # Pillow sums the coefficients left to right; padding adds +0.0
        total = total + w[:, k]
    w = torch.where(total[:, None] != 0.0, w / total[:, None], w)
    return xmin, count, w


def _taps(n_in: int, n_out: int, device: torch.device) -> _Taps:
    key = (n_in, n_out, str(device))
    if key not in _TAPS:
        xmin, count, w = _bilinear_coeffs(n_in, n_out)
        k = torch.arange(w.shape[1])
        # padding slots point at a source the output does read (count >= 1), so a crop keeps them in range
        index = xmin[:, None] + torch.minimum(k[None, :], count[:, None] - 1)
        valid = k[None, :] < count[:, None]
        _TAPS[key] = _Taps(index=index.to(device), weight=w.to(device), valid=valid.to(device),
                           used=tuple(valid.any(0).tolist()), full=tuple(valid.all(0).tolist()),
                           first=int(xmin.min()), last=int((xmin + count).max()))
    return _TAPS[key]


def _resample_axis(x: torch.Tensor, dim: int, taps: _Taps) -> torch.Tensor:
    """One Pillow pass along `dim` of float32 x: double accumulation tap by tap, float32 result."""
    shape = [1] * x.dim()
    shape[dim] = -1  # broadcast per-output coefficients along `dim`
    acc = None
    for k in range(taps.weight.shape[1]):
        if not taps.used[k]:
            continue  # a slot no output uses (the widest tap count is often 1 below K)
        term = x.index_select(dim, taps.index[:, k]).double() * taps.weight[:, k].view(shape)
        if not taps.full[k]:
            # Pillow never reads past count: a zero-weight term would still turn inf into NaN
            term = torch.where(taps.valid[:, k].view(shape), term,
                               torch.zeros((), dtype=term.dtype, device=term.device))
        # starting from +0.0 as Pillow does keeps a lone -0.0 product from surviving as -0.0
        acc = term + 0.0 if acc is None else acc + term
    return acc.float()


def _check_size(x: torch.Tensor, size: tuple[int, int]) -> tuple[int, int]:
    if x.dim() < 2:
        raise InputError(f"pil_bilinear needs maps (..., h, w), got shape {tuple(x.shape)}")
    if x.shape[-2] < 1 or x.shape[-1] < 1:
        raise InputError(f"pil_bilinear needs maps of at least 1x1, got shape {tuple(x.shape)}")
    if len(size) != 2 or any(int(s) != s or int(s) < 1 for s in size):
        raise InputError(f"pil_bilinear size must be two positive ints (H, W), got {size!r}")
    return int(size[0]), int(size[1])


def _vertical_first(h: int, w: int, out_h: int, out_w: int) -> bool:
    # Pillow >= 13 (python-pillow/Pillow#9549) shrinks height first when it drops by more than
    # twice as many rows as the width drops columns; found to hold exactly on thousands of
    # random size pairs. Older Pillow always went horizontal first; the two agree on upscaling.
    return out_h < h and h - out_h > 2 * (w - out_w)


def pil_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize maps x (..., h, w) to (..., H, W) exactly as Pillow's BILINEAR resize of 'F' images.

    x is taken as float32 (what a mode-'F' image stores); the result is
    float32 on x's device, bit for bit `Image.fromarray(map).resize((W, H),
    Image.BILINEAR)` for every map (see the module docstring).
    """
    out_h, out_w = _check_size(x, size)
    h, w = x.shape[-2], x.shape[-1]
    x = x.float()
    if (out_h, out_w) == (h, w):
        return x.clone()  # Image.resize returns a copy
    if out_w == w:
        return _resample_axis(x, -2, _taps(h, out_h, x.device))
    if out_h == h:
        return _resample_axis(x, -1, _taps(w, out_w, x.device))
    vert, horiz = _taps(h, out_h, x.device), _taps(w, out_w, x.device)
    if _vertical_first(h, w, out_h, out_w):
        # only the columns the second pass reads, like Pillow's crop of the first pass
        x = _resample_axis(x[..., horiz.first:horiz.last], -2, vert)
        return _resample_axis(x, -1, _shifted(horiz))
    x = _resample_axis(x[..., vert.first:vert.last, :], -1, horiz)
    return _resample_axis(x, -2, _shifted(vert))


def _shifted(taps: _Taps) -> _Taps:
    """The same taps, indexing a source cropped to [first, last)."""
    if taps.first == 0:
        return taps
    return _Taps(index=taps.index - taps.first, weight=taps.weight, valid=taps.valid, used=taps.used,
                 full=taps.full, first=0, last=taps.last - taps.first)


# ---------------------------------------------------------------- sparse masks
#
# `pil_mask_pixels` finds the on-pixels of `pil_bilinear(x) > T` without the dense maps, and
# exactly: it computes every candidate pixel with Pillow's own arithmetic (the same products,
# sums in the same order, the same float32 roundings), so no pixel is ever ambiguous.
# Along an axis, outputs that read the same source range form a "cell"; a 2-D cell is the
# product of a row cell and a column cell, and every output pixel lies in exactly one. A
# pixel blends its cell's sources with weights >= 0 that sum to 1, twice rounded, so it
# exceeds the largest of them by at most ~3e-7 of the map's largest |finite value| (or is
# inf/NaN because one of them is): only cells holding a source above T - 1e-5 * that are
# evaluated.

_HOT_MARGIN = 1e-5  # relative to the map's largest finite |value|; rounding needs ~3e-7


@dataclass(frozen=True)
class _CellAxis:
    """One axis grouped into cells: cell c's outputs all read sources src[c, :count]."""
    src: torch.Tensor        # (C, K) int64 source of tap k; the cell's last source in padding slots
    tap_valid: torch.Tensor  # (C, K) bool: k < count
    used: tuple[bool, ...]   # per tap slot: some cell reads it
    full: tuple[bool, ...]   # per tap slot: every cell reads it
    out: torch.Tensor        # (C, R) int64 outputs of the cell; its last output in padding slots
    out_valid: torch.Tensor  # (C, R) bool
    weight: torch.Tensor     # (K, C, R) float64 coefficient of tap k for each output of the cell
    identity: bool           # the axis keeps its size: Pillow skips this pass, values pass as they are


_CELLS: dict[tuple[int, int, str], _CellAxis] = {}


def _padded_groups(group: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_groups, R) members of each group (ascending; the last member repeated) and validity."""
    order = torch.argsort(group, stable=True)
    count = torch.bincount(group, minlength=n_groups)
    start = torch.cumsum(count, 0) - count
    slot = torch.arange(int(count.max()))
    valid = slot[None, :] < count[:, None]
    at = start[:, None] + torch.minimum(slot[None, :], count[:, None] - 1)
    return order[at], valid


def _to(value: object, device: torch.device) -> object:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _cell_axis(n_in: int, n_out: int, device: torch.device) -> _CellAxis:
    key = (n_in, n_out, str(device))
    if key in _CELLS:
        return _CELLS[key]
    if n_in == n_out:
        ids = torch.arange(n_in)
        true = torch.ones(n_in, 1, dtype=torch.bool)
        axis = _CellAxis(src=ids[:, None], tap_valid=true, used=(True,), full=(True,), out=ids[:, None],
                         out_valid=true, weight=torch.ones(1, n_in, 1, dtype=torch.float64), identity=True)
    else:
        taps = _taps(n_in, n_out, torch.device("cpu"))
        xmin, count = taps.index[:, 0], taps.valid.sum(1)
        pair = xmin * (taps.index.shape[1] + 1) + count  # one id per source range
        ranges, cell = torch.unique(pair, return_inverse=True)
        out, out_valid = _padded_groups(cell, ranges.numel())  # (C, R)
        first = out[:, 0]  # all outputs of a cell share its taps
        tap_valid = taps.valid[first]
        axis = _CellAxis(src=taps.index[first], tap_valid=tap_valid, used=tuple(tap_valid.any(0).tolist()),
                         full=tuple(tap_valid.all(0).tolist()), out=out, out_valid=out_valid,
                         weight=taps.weight[out].permute(2, 0, 1).contiguous(), identity=False)
    axis = _CellAxis(**{f.name: _to(getattr(axis, f.name), device) for f in fields(axis)})
    _CELLS[key] = axis
    return axis


def _finite_magnitude(x: torch.Tensor) -> torch.Tensor:
    """(N,) float64 largest |finite value| of each map (N, h, w); 0 for a map with none."""
    mag = torch.maximum(x.amax(dim=(1, 2)).abs(), x.amin(dim=(1, 2)).abs()).double()
    odd = torch.nonzero(~torch.isfinite(mag)).squeeze(1)  # maps holding inf or NaN: rare, redo them
    if odd.numel():
        sub = x.index_select(0, odd)
        fin = torch.where(torch.isfinite(sub), sub.abs(), torch.zeros((), device=x.device))
        mag[odd] = fin.amax(dim=(1, 2)).double()
    return mag


def _hot_cells(x: torch.Tensor, floor: torch.Tensor, rows: _CellAxis, cols: _CellAxis
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(map, row cell, col cell) of the cells of x (N, h, w) holding a source above floor (N,) float32."""
    hot = x > floor.view(-1, 1, 1)  # (N, h, w)
    # gathers along dim 1 copy whole rows (fast); along the last dim they go element by element
    by_row = hot.index_select(1, rows.src[:, 0])
    for k in range(1, rows.src.shape[1]):  # padding slots repeat a real source: OR-ing them is harmless
        by_row |= hot.index_select(1, rows.src[:, k])  # (N, Cr, w)
    del hot
    by_row = by_row.transpose(1, 2).contiguous()  # (N, w, Cr)
    cells = by_row.index_select(1, cols.src[:, 0])
    for k in range(1, cols.src.shape[1]):
        cells |= by_row.index_select(1, cols.src[:, k])  # (N, Cc, Cr)
    cc, cr = cells.shape[1], cells.shape[2]
    at = torch.nonzero(cells.view(-1)).squeeze(1)
    return torch.div(at, cc * cr, rounding_mode="floor"), at % cr, torch.div(at, cr, rounding_mode="floor") % cc


def _keep_valid(term: torch.Tensor, axis: _CellAxis, k: int, cell: torch.Tensor) -> torch.Tensor:
    # Pillow stops at count: past it a zero-weight product would still turn inf into NaN
    if axis.full[k]:
        return term
    valid = axis.tap_valid[:, k].index_select(0, cell).view(-1, *([1] * (term.dim() - 1)))
    return torch.where(valid, term, torch.zeros((), dtype=term.dtype, device=term.device))


def _first_pass(values: list[torch.Tensor | None], cols: _CellAxis, cell: torch.Tensor) -> torch.Tensor:
    """Sources values[j] (n,) at column tap j -> Pillow's float32 temporary (n, Rc) over the cells' outputs."""
    if cols.identity:
        return values[0][:, None]
    acc = None
    for j, v in enumerate(values):
        if v is None:
            continue
        term = _keep_valid(v.double()[:, None] * cols.weight[j].index_select(0, cell), cols, j, cell)
        # no leading +0.0 as in Pillow: it only sets the sign of a zero, which no `>` test sees
        acc = term if acc is None else acc + term
    return acc.float()


def _second_pass(temps: list[torch.Tensor | None], rows: _CellAxis, cell: torch.Tensor) -> torch.Tensor:
    """Temporaries temps[k] (n, Rc) at row tap k -> Pillow's float32 output (n, Rr, Rc)."""
    if rows.identity:
        return temps[0][:, None, :]
    acc = None
    for k, t in enumerate(temps):
        if t is None:
            continue
        term = t.double()[:, None, :] * rows.weight[k].index_select(0, cell)[:, :, None]
        term = _keep_valid(term, rows, k, cell)
        acc = term if acc is None else acc + term
    return acc.float()


def _cells_on(x: torch.Tensor, thr: torch.Tensor, rows: _CellAxis, cols: _CellAxis, m: torch.Tensor,
              cy: torch.Tensor, cx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Evaluate the pixels of cells (map m, row cell cy, col cell cx) exactly: on-pixels as (map, row, col)."""
    h, w = x.shape[1], x.shape[2]
    rr, rc = rows.out.shape[1], cols.out.shape[1]
    flat = x.view(-1)
    temps: list[torch.Tensor | None] = []
    for k, used in enumerate(rows.used):
        if not used:
            temps.append(None)
            continue
        at = m * (h * w) + rows.src[:, k].index_select(0, cy) * w  # (n,) start of the source row
        values = [flat.index_select(0, at + cols.src[:, j].index_select(0, cx)) if cols.used[j] else None
                  for j in range(cols.src.shape[1])]
        temps.append(_first_pass(values, cols, cx))
    out = _second_pass(temps, rows, cy)  # (n, Rr, Rc) float32
    on = out.double() > thr.index_select(0, m).view(-1, 1, 1)
    on &= rows.out_valid.index_select(0, cy)[:, :, None] & cols.out_valid.index_select(0, cx)[:, None, :]
    hit = torch.nonzero(on.view(-1)).squeeze(1)
    c = torch.div(hit, rr * rc, rounding_mode="floor")
    r = torch.div(hit, rc, rounding_mode="floor") % rr
    q = hit % rc
    return (m.index_select(0, c), rows.out.view(-1).index_select(0, cy.index_select(0, c) * rr + r),
            cols.out.view(-1).index_select(0, cx.index_select(0, c) * rc + q))


def pil_mask_pixels(x: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int],
                    max_elements: int = 1 << 23) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (maps (n,), pix (n,)) int64: the on-pixels of `pil_bilinear(x, size)[m].double() > thresholds[m]`.

    x (N, h, w) maps, thresholds (N,) (float64 ones are used as they are);
    pix = y * W + x. Every on-pixel comes exactly once, bit for bit those of
    the dense expression, but only the cells near values above the threshold
    are computed (see the comment above); at most `max_elements` candidate
    pixels at a time.
    """
    out_h, out_w = _check_size(x, size)
    if x.dim() != 3 or thresholds.shape != (x.shape[0],):
        raise InputError(f"pil_mask_pixels needs maps (N, h, w) and thresholds (N,), got shapes "
                         f"{tuple(x.shape)} and {tuple(thresholds.shape)}")
    n_maps, h, w = x.shape
    if n_maps == 0:
        return
    x = x.float()
    dev = x.device
    thr = thresholds.to(dev).double()
    vertical_first = _vertical_first(h, w, out_h, out_w)
    if vertical_first:  # the same arithmetic as the horizontal-first order on transposed maps
        x, rows, cols = x.transpose(1, 2), _cell_axis(w, out_w, dev), _cell_axis(h, out_h, dev)
    else:
        rows, cols = _cell_axis(h, out_h, dev), _cell_axis(w, out_w, dev)
    x = x.contiguous()
    # a float32 floor at or below the float64 one: the big comparison stays in float32 (it only
    # decides what to evaluate, so a floor a hair too low costs nothing but a few extra cells)
    floor = torch.nextafter((thr - _HOT_MARGIN * _finite_magnitude(x)).float(),
                            torch.tensor(-math.inf, device=dev))
    m_all, cy_all, cx_all = _hot_cells(x, floor, rows, cols)
    step = max(1, max_elements // (rows.out.shape[1] * cols.out.shape[1]))
    for s in range(0, m_all.numel(), step):
        sl = slice(s, s + step)
        m, r, c = _cells_on(x, thr, rows, cols, m_all[sl], cy_all[sl], cx_all[sl])
        yield m, (c * out_w + r) if vertical_first else (r * out_w + c)
