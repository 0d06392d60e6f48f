"""Streaming statistics of Network Dissection (netdissect.md sections 2-4).

Three small classes, each with `add`, `merge`, `result`, `state_dict`,
`load_state_dict` and `to`, so one code path serves streaming, caching,
resuming and sharded (multi-GPU) runs:

- `TopQuantile`: the EXACT per-unit quantile at level 1 - top_fraction
  (the threshold T_k), from a bounded buffer of each unit's largest values.
- `IoUTally`: exact int64 tallies G[l], I[u, l], A[u, c] and the IoU.
- `TopImages`: per unit, the k images with the largest spatial-max activation
  (ties by a secondary key, the mask area, then by image index).

Tensors stay on the device the object lives on; counts are int64.
"""
from __future__ import annotations

import abc
import logging
import math
from typing import Any, Callable, NamedTuple

import torch

from broden.errors import InputError
from dissect.config import INTERPOLATIONS, TOP_IMAGE_TIEBREAKS, UNIONS  # defined once, beside their options
from dissect.upsample import check_upsample_mode, mask_pixels

__all__ = ["StreamingStat", "TopQuantile", "IoUTally", "LabelBatch", "TopImages", "iou_from_counts",
           "INTERPOLATIONS", "UNIONS", "TIEBREAKS"]

log = logging.getLogger(__name__)

# Category presence uses bit-coded category sets up to this many categories (Broden has 6).
_MAX_SET_CATEGORIES = 10


def _device(device: Any) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


class StreamingStat(abc.ABC):
    """What the three statistics share: a state format, the options that must agree, and merging a state.

    Subclasses set FORMAT and CONFIG (attribute names that must be equal to merge or load a
    state) and implement add/merge/result/state_dict/load_state_dict/to and `empty_like`.
    """

    FORMAT = ""
    CONFIG: tuple[str, ...] = ()

    @abc.abstractmethod
    def empty_like(self) -> "StreamingStat":
        """A fresh statistic with this one's configuration and device, holding nothing yet."""

    def _header(self) -> dict[str, Any]:
        """The format and configuration part of state_dict()."""
        return {"format": self.FORMAT, **{k: getattr(self, k) for k in self.CONFIG}}

    def _check_state(self, state: dict[str, Any]) -> None:
        """Refuse a state of another format or configuration (names the field)."""
        if state.get("format") != self.FORMAT:
            raise InputError(f"state_dict has format {state.get('format')!r}, expected {self.FORMAT!r}")
        owner = type(self).__name__
        for attr in self.CONFIG:
            if _require(state, attr, owner) != getattr(self, attr):
                raise InputError(f"{owner} state has {attr}={state[attr]!r}, this object has {getattr(self, attr)!r}")

    def _check_mergeable(self, other: "StreamingStat") -> None:
        for attr in self.CONFIG:
            if getattr(self, attr) != getattr(other, attr):
                raise InputError(f"cannot merge {type(self).__name__} with different {attr}: "
                                 f"{getattr(self, attr)!r} vs {getattr(other, attr)!r}")

    def merge_state(self, state: dict[str, Any]) -> None:
        """Merge a state written by another shard's `state_dict` (rank merging, resuming shards)."""
        other = self.empty_like()
        other.load_state_dict(state)
        self.merge(other)


def _require(state: dict, key: str, owner: str) -> Any:
    if key not in state:
        raise InputError(f"{owner} state_dict is missing the field {key!r}")
    return state[key]


def _quantile_plan(n: int, q: float, method: str) -> tuple[int, int, float]:
    """0-based ascending order-statistic indices (lo, hi) and weight of hi, exactly as numpy.quantile.

    numpy computes the virtual index in float64 with these very expressions, so
    the floor/round decisions agree bit for bit.
    """
    if method == "linear":
        v = (n - 1) * q
    elif method == "hazen":
        alpha = beta = 0.5
        v = n * q + (alpha + q * (1 - alpha - beta)) - 1
    elif method == "lower":
        i = int(math.floor((n - 1) * q))
        return i, i, 0.0
    elif method == "higher":
        i = int(math.ceil((n - 1) * q))
        return i, i, 0.0
    elif method == "nearest":
        i = int(round((n - 1) * q))  # round half to even, as np.around
        return i, i, 0.0
    else:
        raise InputError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {method!r}")
    if v >= n - 1:
        return n - 1, n - 1, 0.0
    if v < 0:
        return 0, 0, 0.0
    lo = int(math.floor(v))
    return lo, lo + 1, v - lo


def iou_from_counts(intersection: Any, activation: Any, truth: Any, label_category: Any) -> Any:
    """IoU[u, l] = I / (A[u, cat(l)] + G[l] - I + 1e-10) in float64, as the reference (0 where cat(l) = -1).

    intersection (U, L), activation (U, C) by category index, truth (L,), label_category (L,)
    index into activation's columns. Tensors in, a tensor out (on their device); numpy in, numpy out.
    """
    as_numpy = not isinstance(intersection, torch.Tensor)
    inter = torch.as_tensor(intersection).double()  # (U, L)
    cat = torch.as_tensor(label_category, device=inter.device).long()
    has_cat = cat >= 0
    act = torch.as_tensor(activation, device=inter.device)[:, cat.clamp(min=0)].double() * has_cat  # (U, L)
    iou = inter / (act + torch.as_tensor(truth, device=inter.device).double()[None, :] - inter + 1e-10)
    iou = torch.where(has_cat[None, :], iou, torch.zeros_like(iou))
    return iou.numpy() if as_numpy else iou


class _Candidates(NamedTuple):
    """Values of one batch that pass a TopQuantile's floor, ranked within their unit."""

    unit: torch.Tensor   # (m,) int64 u
    vals: torch.Tensor   # (m,) the values
    rank: torch.Tensor   # (m,) int64 place among the unit's candidates
    count: torch.Tensor  # (U,) int64 candidates per unit


class TopQuantile(StreamingStat):
    """Exact per-unit quantile at level 1 - top_fraction of all values added, streamed.

    Only order statistics from index `lo` (0-based, ascending; see
    `_quantile_plan`) upward are needed, so each unit keeps the k = n - lo
    largest values seen (n = total_per_unit, fixed up front). Values at or
    below the unit's current k-th largest can never enter the top k and are
    dropped on arrival; survivors are appended to a buffer of 2k slots, which
    is cut back to its k largest (torch.topk) only when the batch's survivors
    would not fit, together with them. The first batch is cut to its own k
    largest, whose smallest becomes the floor. With values in random order a
    cut happens about ln(n / k) times in a whole run.

    Memory bound: 2 * k * U float32 for the buffer (k ~ top_fraction * n,
    e.g. 53,494 for AlexNet conv5 on Broden: 110 MB for 256 units), plus per
    `add` a bool copy of the batch and the indices of the values that pass
    (~k * batch / seen of them per unit), and during a cut a second copy of
    the buffer with those values appended.
    Merging shards is exact: the merged buffer is the top k of the union.
    NaN activations are kept (topk ranks them first) and make `result` raise.
    """

    def __init__(self, num_units: int, total_per_unit: int, top_fraction: float = 0.005,
                 interpolation: str = "hazen", device: Any = None) -> None:
        if int(num_units) < 1:
            raise InputError(f"num_units must be >= 1, got {num_units}")
        if int(total_per_unit) < 1:
            raise InputError(f"total_per_unit must be >= 1, got {total_per_unit}")
        if not 0.0 < float(top_fraction) < 1.0:
            raise InputError(f"top_fraction must lie strictly between 0 and 1, got {top_fraction}")
        if interpolation not in INTERPOLATIONS:
            raise InputError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                             f"got {interpolation!r}")
        self.num_units = int(num_units)
        self.total_per_unit = int(total_per_unit)
        self.top_fraction = float(top_fraction)
        self.interpolation = interpolation
        self.level = 1.0 - self.top_fraction
        self._lo, self._hi, self._gamma = _quantile_plan(self.total_per_unit, self.level,
                                                         interpolation)
        self.k = self.total_per_unit - self._lo  # how many of the largest values we need
        self.capacity = 2 * self.k
        self.device = _device(device)
        self.count = 0  # values added per unit
        self._reset_buffers()

    FORMAT = "dissect.stats.TopQuantile"
    CONFIG = ("num_units", "total_per_unit", "top_fraction", "interpolation")

    def empty_like(self) -> "TopQuantile":
        """A fresh TopQuantile with this one's configuration and device."""
        return TopQuantile(self.num_units, self.total_per_unit, self.top_fraction, self.interpolation,
                           device=self.device)

    def _reset_buffers(self) -> None:
        u, dev = self.num_units, self.device
        # -inf marks an empty slot; valid values fill each row from the left (`_fill` of them)
        self._buf = torch.full((u, self.capacity), -math.inf, dtype=torch.float32, device=dev)
        self._fill = torch.zeros(u, dtype=torch.int64, device=dev)
        self._floor = torch.full((u,), -math.inf, dtype=torch.float32, device=dev)
        self._fill_bound = 0  # host-side upper bound of max(fill), saves a sync per add

    def to(self, device: Any) -> "TopQuantile":
        """Move the state to `device` (in place); returns self."""
        self.device = torch.device(device)
        for name in ("_buf", "_fill", "_floor"):
            setattr(self, name, getattr(self, name).to(self.device))
        return self

    def _as_blocks(self, acts: torch.Tensor) -> torch.Tensor:
        if acts.dim() == 4:
            if acts.shape[1] != self.num_units:
                raise InputError(f"activations have {acts.shape[1]} units, expected {self.num_units}")
            return acts.reshape(acts.shape[0], self.num_units, -1)  # (B, U, h*w), a view
        if acts.dim() == 2:
            if acts.shape[0] != self.num_units:
                raise InputError(f"activations have {acts.shape[0]} units, expected {self.num_units}")
            return acts[None]  # (1, U, n)
        raise InputError(f"activations must be (B, U, h, w) or (U, n), got shape {tuple(acts.shape)}")

    def _compact(self, extra: _Candidates, n: int) -> None:
        """Cut the buffer together with a batch's candidates (n values per unit at most) to its k largest."""
        # the candidates as (U, most per unit) rows: one topk over buffer and batch together
        pad = torch.full((self.num_units, int(extra.count.max())), -math.inf, dtype=torch.float32,
                         device=self.device)
        pad[extra.unit, extra.rank] = extra.vals.float()
        # sorted so the valid values sit in the first `fill` slots (NaN sorts first and stays)
        top = torch.cat([self._buf, pad], dim=1).topk(self.k, dim=1, largest=True, sorted=True).values
        self._buf[:, :self.k] = top
        self._buf[:, self.k:] = -math.inf
        self._fill = (self._fill + extra.count).clamp(max=self.k)
        self._floor = torch.where(self._fill >= self.k, top[:, self.k - 1],
                                  torch.full_like(self._floor, -math.inf))
        self._fill_bound = min(self._fill_bound + n, self.k)
        log.debug("TopQuantile: buffer cut back to the %d largest values per unit", self.k)

    def _cut(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # a batch (B, U, p) cut to its k largest values per unit: ((1, U, k), (U,) the k-th largest)
        rows = v.transpose(0, 1).reshape(self.num_units, -1)
        top = rows.topk(self.k, dim=1, sorted=False).values  # (U, k)
        return top[None], top.amin(dim=1)

    def _candidates(self, v: torch.Tensor) -> _Candidates:
        # the values of v (B, U, p) above their unit's floor, ranked within their unit
        nb, u, p = v.shape
        keep = ~(v <= self._floor.view(1, -1, 1))  # NaN is kept, so result() can refuse it
        at = torch.nonzero(keep.view(-1)).squeeze(1)  # (m,) flat (b*U + u)*p + i, ascending
        vals = v.reshape(-1).index_select(0, at)
        blk = torch.div(at, p, rounding_mode="floor")  # (m,) block b*U + u
        per_blk = torch.bincount(blk, minlength=nb * u)  # (B*U,)
        first = torch.cumsum(per_blk, 0) - per_blk  # where each block starts in `at`
        before = (torch.cumsum(per_blk.view(nb, u), 0) - per_blk.view(nb, u)).view(-1)  # unit's, earlier blocks
        # rank within the unit without sorting: earlier blocks' candidates + place within the block
        rank = before.index_select(0, blk) + torch.arange(at.numel(), device=self.device) - first.index_select(0, blk)
        return _Candidates(blk % u, vals, rank, per_blk.view(nb, u).sum(0))

    def add(self, acts: torch.Tensor) -> None:
        """Add a batch of activations, (B, U, h, w) or (U, n)."""
        v = self._as_blocks(acts).to(self.device)  # (B, U, p)
        n = v.shape[0] * v.shape[2]
        if self.count + n > self.total_per_unit:
            raise InputError(f"TopQuantile was told to expect {self.total_per_unit} values per unit "
                             f"but got {self.count + n}: check total_per_unit (N*h*w)")
        seen, self.count = self.count, self.count + n
        if n == 0:
            return
        # Only the k largest of a batch can matter. The first batch is cut to them (topk), which
        # sets the floor; later about k * n / seen values per unit pass the floor test (for values
        # in random order), and a cut of the 2k buffer with those candidates is cheaper than a
        # topk over a whole batch. Either way the result is exact.
        cut_floor = None
        if n > self.k and seen == 0:
            v, cut_floor = self._cut(v)
            n = self.k
        c = self._candidates(v)
        if self._fill_bound + n > self.capacity and int((self._fill + c.count).max()) > self.capacity:
            # a cut over the 2k buffer and the candidates: far cheaper than a topk over the whole
            # batch, however many of its values one unit lets through
            self._compact(c, n)
        else:
            self._buf[c.unit, self._fill.index_select(0, c.unit) + c.rank] = c.vals.float()
            self._fill += c.count
            self._fill_bound = min(self.capacity, self._fill_bound + n)
        if cut_floor is not None:
            # The k values just kept are all >= the batch's k-th largest, so no later value at or
            # below it can enter the top k: without this the floor stays -inf until the first
            # compaction and the next batch passes whole through `_candidates`. fmax: a NaN
            # k-th value leaves the floor as it was (a lower floor is always safe).
            self._floor = torch.fmax(self._floor, cut_floor)

    def merge(self, other: "TopQuantile") -> None:
        """Fold in another shard's state (same configuration), exactly."""
        self._check_mergeable(other)
        if self.count + other.count > self.total_per_unit:
            raise InputError(f"merged TopQuantile would hold {self.count + other.count} values per "
                             f"unit, more than total_per_unit={self.total_per_unit}")
        both = torch.cat([self._buf,
                          other._buf.to(self.device)], dim=1)
        top = both.topk(self.k, dim=1, sorted=True).values  # (U, k)
        self._buf.fill_(-math.inf)
        self._buf[:, :self.k] = top
        self._fill = (self._fill + other._fill.to(self.device)).clamp(max=self.k)
        self._floor = torch.where(self._fill >= self.k, top[:, self.k - 1],
                                  torch.full_like(self._floor, -math.inf))
        self._fill_bound = self.k
        self.count += other.count

    def nan_units(self) -> torch.Tensor:
        """(U,) bool: units that were given a NaN (NaN is always kept, so this is exact)."""
        return torch.isnan(self._buf).any(dim=1)

    def result(self) -> torch.Tensor:
        """The per-unit quantile, (U,) float32; raises unless exactly total_per_unit values were added."""
        if self.count != self.total_per_unit:
            raise InputError(f"TopQuantile has {self.count} values per unit, expected "
                             f"total_per_unit={self.total_per_unit}: the stream is incomplete")
        top = self._buf.topk(self.k, dim=1, sorted=True).values  # (U, k) descending
        if bool(torch.isnan(top[:, 0]).any()):  # topk ranks NaN above everything
            raise InputError("activations contained NaN values; a quantile threshold is undefined")
        n = self.total_per_unit
        a = top[:, n - 1 - self._lo].double()
        b = top[:, n - 1 - self._hi].double()
        if self._lo == self._hi:
            return a.float()
        t = self._gamma
        diff = b - a
        # numpy's _lerp: interpolate from the nearer end for stability
        out = b - diff * (1 - t) if t >= 0.5 else a + diff * t
        return out.float()

    def state_dict(self) -> dict[str, Any]:
        """Compact state: the k largest values per unit and the counters."""
        top = self._buf.topk(self.k, dim=1, sorted=True).values
        return {**self._header(), "count": self.count,
                "values": top.clone(),
                "fill": self._fill.clamp(max=self.k).clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state written by `state_dict` (configuration must match)."""
        self._check_state(state)
        values = _require(state, "values", "TopQuantile")
        if tuple(values.shape) != (self.num_units, self.k):
            raise InputError(f"TopQuantile state 'values' has shape {tuple(values.shape)}, "
                             f"expected {(self.num_units, self.k)}")
        self._reset_buffers()
        self._buf[:, :self.k] = values.to(self.device, torch.float32)
        # a copy: `add` updates fill in place and must not write through into the caller's state
        self._fill = _require(state, "fill", "TopQuantile").to(self.device, torch.int64).clone()
        self._floor = torch.where(self._fill >= self.k, self._buf[:, self.k - 1],
                                  torch.full_like(self._floor, -math.inf))
        self._fill_bound = self.k
        self.count = int(_require(state, "count", "TopQuantile"))


class LabelBatch:
    """One batch's labels, prepared once for the tallies of every layer (`IoUTally.prepare_labels`).

    Holds what does not depend on units: labels per pixel, each pixel's set of
    categories (bit-coded), the G contribution and the categories present per
    image. Built for tallies with the same label_category, categories and union.
    """

    def __init__(self, tally: "IoUTally", labels: torch.Tensor, image_labels: torch.Tensor) -> None:
        dev, nc = tally.device, tally.num_categories
        b = labels.shape[0]
        tally._check_labels(b, tuple(labels.shape[2:]), labels, image_labels)
        self.key = (tally.num_categories, tally.union, tally.num_labels)
        self.label_category = tally.label_category
        self.size = (int(labels.shape[2]), int(labels.shape[3]))
        self.b, self.k, self.p = b, labels.shape[1], self.size[0] * self.size[1]
        self.labels = labels.to(dev).reshape(b, self.k, self.p)  # (B, K, P)
        self.by_pixel = self.labels.permute(0, 2, 1).reshape(b * self.p, self.k)  # (B*P, K)
        self.image_labels = image_labels.to(dev, torch.int64)  # (B, M)
        # Category presence goes through each pixel's SET of categories, coded as bits: one
        # lookup per on-pixel instead of K, then (B*U, 2^C) set counts -> (B*U, C) presence.
        self.sets = 1 << nc if nc <= _MAX_SET_CATEGORIES else 0
        self.pixel_set = self._pixel_sets(tally.category_bit) if self.k and self.sets else None  # (B*P,)
        codes = torch.arange(max(self.sets, 1), device=dev)
        self.set_members = ((codes[:, None] >> torch.arange(nc, device=dev)) & 1).float()  # (2^C, C)
        self.truth = self._truth(tally)  # (L,) this batch's G
        self.img_cat_present = self._image_categories(tally)  # (B, C) from image-level labels
        self.anywhere = self._anywhere(tally) if tally.union == "original" else None  # (B, C)

    def _pixel_sets(self, category_bit: torch.Tensor) -> torch.Tensor:
        bits = category_bit[self.labels]  # (B, K, P)
        out = bits[:, 0]
        for layer in range(1, self.k):  # OR over the few label layers
            out = out | bits[:, layer]
        return out.reshape(-1)  # (B*P,)

    def _truth(self, t: "IoUTally") -> torch.Tensor:
        # G: pixel labels of every layer, then image-level labels (sh*sw each)
        truth = torch.zeros(t.num_labels, dtype=torch.int64, device=t.device)
        if self.k:
            truth += torch.bincount(self.labels.reshape(-1), minlength=t.num_labels)
        if self.image_labels.numel():
            truth += torch.bincount(self.image_labels.reshape(-1), minlength=t.num_labels) * self.p
        truth[0] = 0
        return truth

    def _image_categories(self, t: "IoUTally") -> torch.Tensor:
        b, dev = self.b, t.device
        present = torch.zeros(b, t.num_categories, dtype=torch.bool, device=dev)  # (B, C)
        if self.image_labels.numel():
            m = self.image_labels.shape[1]
            icat = t.label_category[self.image_labels]  # (B, M)
            ok = icat >= 0
            rows = torch.arange(b, device=dev)[:, None].expand(b, m)
            present[rows[ok], icat[ok]] = True
        return present

    def _anywhere(self, t: "IoUTally") -> torch.Tensor:
        # union="original": categories with a label anywhere in the image
        b, nc, dev = self.b, t.num_categories, t.device
        present = self.img_cat_present
        if self.k and self.sets:
            keys = torch.arange(b, device=dev).repeat_interleave(self.p) * self.sets + self.pixel_set
            seen = (torch.bincount(keys, minlength=b * self.sets).view(b, self.sets) > 0).float()
            present = present | (seen @ self.set_members > 0)
        elif self.k:
            cats = t.label_category[self.labels.reshape(b, -1).long()]  # (B, K*P)
            keys = (torch.arange(b, device=dev)[:, None] * nc + cats)[cats >= 0]
            present = present | (torch.bincount(keys, minlength=b * nc).view(b, nc) > 0)
        return present

    def check(self, t: "IoUTally") -> None:
        """Raise unless this batch was prepared for tallies like `t`."""
        if self.key != (t.num_categories, t.union, t.num_labels) or not (
                self.label_category is t.label_category or torch.equal(self.label_category, t.label_category)):
            raise InputError("LabelBatch was prepared by an IoUTally with other labels, categories or union")


class _Batch:
    """One batch's tally in progress: fed the on-pixels of the masks, chunk by chunk."""

    def __init__(self, tally: "IoUTally", lb: LabelBatch) -> None:
        lb.check(tally)
        self.t, self.lb = tally, lb
        dev, nl, nc, u = tally.device, tally.num_labels, tally.num_categories, tally.num_units
        self.b, self.k, self.p = lb.b, lb.k, lb.p
        self.counts = torch.zeros(self.b * u, dtype=torch.int64, device=dev)  # |mask| per (image, unit)
        self.inter = torch.zeros(u * nl, dtype=torch.int64, device=dev)
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.pending_count = 0
        self.sets = lb.sets
        width = (self.sets if self.sets else nc) if tally.union == "lite" else 0
        self.present = torch.zeros(self.b * u * width, dtype=torch.int64, device=dev)  # lite presence

    def on_pixels(self, bu: torch.Tensor, pix: torch.Tensor) -> None:
        """Take mask pixels that are on: bu (n,) = image*U + unit, pix (n,) = y*sw + x."""
        # pooled, because each tally pass costs a few (U*L)-sized bincounts whatever n is
        self.pending.append((bu, pix))
        self.pending_count += bu.numel()
        if self.pending_count >= self.t.chunk_elements:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        bu = torch.cat([p[0] for p in self.pending])
        pix = torch.cat([p[1] for p in self.pending])
        self.pending, self.pending_count = [], 0
        if bu.numel() == 0:
            return
        t, lb = self.t, self.lb
        u, nl, nc = t.num_units, t.num_labels, t.num_categories
        self.counts += torch.bincount(bu, minlength=self.b * u)
        if self.k == 0:
            return
        at = (bu // u) * self.p + pix  # (n,) row of by_pixel
        lab = lb.by_pixel[at].long()  # (n, K)
        self.inter += torch.bincount(((bu % u)[:, None] * nl + lab).reshape(-1), minlength=u * nl)
        if t.union != "lite":
            return
        if lb.pixel_set is not None:
            keys = bu * self.sets + lb.pixel_set[at]
            self.present += torch.bincount(keys, minlength=self.b * u * self.sets)
        else:
            cat = t.label_category[lab]  # (n, K)
            keys = (bu[:, None] * nc + cat)[cat >= 0]
            self.present += torch.bincount(keys, minlength=self.b * u * nc)

    def finish(self) -> torch.Tensor:
        """Fold the batch into the tally: G, image-level intersections and A; return |mask| (B, U) int64."""
        self._flush()
        t, lb, b = self.t, self.lb, self.b
        u, nl, nc = t.num_units, t.num_labels, t.num_categories
        counts = self.counts.view(b, u)  # (B, U)
        t.intersection += self.inter.view(u, nl)
        t.truth += lb.truth
        image_labels = lb.image_labels
        if image_labels.numel():
            m = image_labels.shape[1]
            # I[u, l] += |mask_u| for each image-level label l of the image
            src = (counts.t()[:, :, None] * (image_labels != 0)[None]).reshape(u, b * m)  # (U, B*M)
            t.intersection.index_add_(1, image_labels.reshape(-1), src)
        t.intersection[:, 0] = 0

        if t.union == "lite":
            if self.sets:
                seen = (self.present.view(b * u, self.sets) > 0).float()  # (B*U, 2^C)
                pixel_present = (seen @ lb.set_members > 0).view(b, u, nc)
            else:
                pixel_present = self.present.view(b, u, nc) > 0
            present = lb.img_cat_present[:, None, :] | pixel_present  # (B, U, C)
        else:
            present = lb.anywhere[:, None, :]  # (B, 1, C)
        t.activation += (present.long() * counts[:, :, None]).sum(dim=0)
        t.images += b
        return counts


class IoUTally(StreamingStat):
    """Exact int64 tallies of unit masks against Broden labels, and the IoU.

    Over all images: `truth[l]` = pixels labelled l (every label layer counts;
    an image-level label counts sh*sw); `intersection[u, l]` = pixels where
    mask_u is on and l is present, per layer, plus |mask_u| for each
    image-level label l; `activation[u, c]` = |mask_u| summed over the images
    where category c is "present":

    - union="lite" (NetDissect-Lite `tally_job`, the default): c is present
      for unit u in an image when some label of c (by its primary category)
      lies under mask_u in any layer, or c has an image-level label there.
    - union="original": c has any label anywhere in the image (any layer,
      or image level).

    iou[u, l] = I / (A[u, cat(l)] + G[l] - I + 1e-10), computed in float64.
    Ids whose category is -1 (0 and unused ids) are tallied but get IoU 0.
    Masks are read sparsely: past one scan of the masks (`add`) or of the
    maps that can fire (`add_activations`), the cost scales with the number
    of mask pixels that are on (about top_fraction of all), never with
    units x labels.
    """

    def __init__(self, num_units: int, label_category: torch.Tensor, num_categories: int,
                 union: str = "lite", device: Any = None, chunk_elements: int = 1 << 22) -> None:
        if int(num_units) < 1:
            raise InputError(f"num_units must be >= 1, got {num_units}")
        if union not in UNIONS:
            raise InputError(f"union must be one of {', '.join(UNIONS)}, got {union!r}")
        label_category = torch.as_tensor(label_category)
        if label_category.dim() != 1 or label_category.numel() < 1:
            raise InputError("label_category must be a 1-D tensor over global label ids (L,), "
                             f"got shape {tuple(label_category.shape)}")
        if label_category.numel() and (int(label_category.min()) < -1
                                       or int(label_category.max()) >= int(num_categories)):
            raise InputError(f"label_category values must lie in -1..{int(num_categories) - 1}")
        self.device = _device(device)
        self.num_units = int(num_units)
        self.num_categories = int(num_categories)
        self.union = union
        self.chunk_elements = int(chunk_elements)
        cat = label_category.to(self.device, torch.int64).clone()
        cat[0] = -1  # id 0 is "unlabeled": never makes a category present
        self.label_category = cat
        # per id, the bit of its category (0 for none): codes a pixel's set of categories
        self.category_bit = torch.where(cat >= 0, torch.ones_like(cat) << cat.clamp(min=0),
                                        torch.zeros_like(cat))
        self.num_labels = int(cat.numel())
        self.images = 0
        u, l, c = self.num_units, self.num_labels, self.num_categories
        self.truth = torch.zeros(l, dtype=torch.int64, device=self.device)
        self.intersection = torch.zeros(u, l, dtype=torch.int64, device=self.device)
        self.activation = torch.zeros(u, c, dtype=torch.int64, device=self.device)

    FORMAT = "dissect.stats.IoUTally"
    CONFIG = ("num_units", "num_categories", "union")

    def empty_like(self) -> "IoUTally":
        """A fresh IoUTally with this one's units, labels, categories, union and device."""
        return IoUTally(self.num_units, self.label_category, self.num_categories, self.union,
                        device=self.device, chunk_elements=self.chunk_elements)

    def to(self, device: Any) -> "IoUTally":
        """Move the state to `device` (in place); returns self."""
        self.device = torch.device(device)
        for name in ("label_category", "category_bit", "truth", "intersection", "activation"):
            setattr(self, name, getattr(self, name).to(self.device))
        return self

    def _check_labels(self, b: int, size: tuple[int, int], labels: torch.Tensor,
                      image_labels: torch.Tensor) -> None:
        sh, sw = size
        if labels.dim() != 4 or labels.shape[0] != b or tuple(labels.shape[2:]) != (sh, sw) \
                or labels.is_floating_point():
            raise InputError(f"labels must be an integer (B={b}, K, {sh}, {sw}) tensor, got "
                             f"{labels.dtype} {tuple(labels.shape)}")
        if image_labels.dim() != 2 or image_labels.shape[0] != b or image_labels.is_floating_point():
            raise InputError(f"image_labels must be an integer (B={b}, M) tensor, got "
                             f"{image_labels.dtype} {tuple(image_labels.shape)}")
        for name, t in (("labels", labels), ("image_labels", image_labels)):
            if t.numel():
                lo, hi = torch.aminmax(t)
                if int(lo) < 0 or int(hi) >= self.num_labels:
                    raise InputError(f"{name} hold ids {int(lo)}..{int(hi)}, outside the "
                                     f"{self.num_labels} global label ids 0..{self.num_labels - 1}")

    def add(self, masks: torch.Tensor, labels: torch.Tensor, image_labels: torch.Tensor) -> None:
        """Tally a batch: masks (B, U, sh, sw) bool, labels (B, K, sh, sw) ids, image_labels (B, M) ids."""
        if masks.dtype != torch.bool or masks.dim() != 4 or masks.shape[1] != self.num_units:
            raise InputError(f"masks must be a bool (B, {self.num_units}, sh, sw) tensor, got "
                             f"{masks.dtype} {tuple(masks.shape)}")
        b, u, sh, sw = masks.shape
        self._check_labels(b, (sh, sw), labels, image_labels)
        p = sh * sw
        flat = masks.to(self.device).reshape(b * u, p)  # (B*U, P)
        batch = _Batch(self, LabelBatch(self, labels, image_labels))
        rows_per_chunk = max(1, self.chunk_elements // p)
        for r0 in range(0, b * u, rows_per_chunk):
            on = torch.nonzero(flat[r0:r0 + rows_per_chunk].reshape(-1)).squeeze(1)  # (n,)
            batch.on_pixels(on // p + r0, on % p)
        batch.finish()

    def prepare_labels(self, labels: torch.Tensor, image_labels: torch.Tensor) -> LabelBatch:
        """Validate and prepare a batch's labels (B, K, sh, sw) and image_labels (B, M) once.

        The result serves `add_activations` of every tally with the same
        label_category, categories and union (one per layer, in a dissection).
        """
        if labels.dim() != 4:
            raise InputError(f"labels must be (B, K, sh, sw), got shape {tuple(labels.shape)}")
        return LabelBatch(self, labels, image_labels)

    def add_activations(self, acts: torch.Tensor, thresholds: torch.Tensor, labels: torch.Tensor | LabelBatch,
                        image_labels: torch.Tensor | None = None, upsample: str = "torch",
                        on_pixels: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Tally a batch from raw maps: the same as `add(upsample(acts, size) > thresholds[u], ...)`.

        Returns the above-threshold area |mask| per (image, unit), (B, U) int64, at the label
        size: counted anyway for A, it breaks ties of the top images (TopImages tiebreak="area").

        acts (B, U, h, w), thresholds (U,); `labels` is the (B, K, sh, sw)
        tensor with `image_labels` (B, M), or a LabelBatch from
        `prepare_labels` (image_labels then None). The label size (sh, sw)
        comes from the labels. Only output windows near source values that
        reach the threshold are computed (`upsample.mask_pixels`) and no
        dense (B, U, sh, sw) mask or upsampled map is ever built.
        upsample="pil" uses Pillow's bilinear arithmetic bit for bit and
        compares in float64 (float64 thresholds are kept as they are), as
        NetDissect-Lite did; see `upsample.mask_pixels`. `on_pixels(rows, pix)`, when given, also
        receives each chunk of on-pixels as tallied (rows b * U + u, pix y * sw + x).
        """
        check_upsample_mode(upsample, "upsample")
        if acts.dim() != 4 or acts.shape[1] != self.num_units:
            raise InputError(f"acts must be (B, {self.num_units}, h, w), got {tuple(acts.shape)}")
        if isinstance(labels, LabelBatch):
            lb = labels
        else:
            if image_labels is None:
                raise InputError("add_activations needs image_labels (B, M) with a labels tensor")
            lb = self.prepare_labels(labels, image_labels)
        if lb.b != acts.shape[0]:
            raise InputError(f"labels are for {lb.b} images, acts for {acts.shape[0]}")
        batch = _Batch(self, lb)
        for rows, pix in mask_pixels(acts.to(self.device), thresholds.to(self.device), lb.size,
                                     self.chunk_elements, mode=upsample):
            batch.on_pixels(rows, pix)
            if on_pixels is not None:
                on_pixels(rows, pix)
        return batch.finish()

    def merge(self, other: "IoUTally") -> None:
        """Add another shard's tallies (same units, labels, categories and union)."""
        self._check_mergeable(other)
        if not torch.equal(self.label_category, other.label_category.to(self.device)):
            raise InputError("cannot merge IoUTally objects with different label_category")
        self.truth += other.truth.to(self.device)
        self.intersection += other.intersection.to(self.device)
        self.activation += other.activation.to(self.device)
        self.images += other.images

    def result(self) -> dict[str, torch.Tensor]:
        """dict(intersection (U, L), activation (U, C), truth (L,), iou (U, L) float32)."""
        iou = iou_from_counts(self.intersection, self.activation, self.truth, self.label_category)
        return {"intersection": self.intersection.clone(), "activation": self.activation.clone(),
                "truth": self.truth.clone(), "iou": iou.float()}

    def state_dict(self) -> dict[str, Any]:
        """Tallies and configuration, as tensors, ints and strings."""
        return {**self._header(), "images": self.images, "label_category": self.label_category.clone(),
                "truth": self.truth.clone(), "intersection": self.intersection.clone(),
                "activation": self.activation.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state written by `state_dict` (configuration must match)."""
        self._check_state(state)
        cat = _require(state, "label_category", "IoUTally").to(self.device, torch.int64)
        if not torch.equal(cat, self.label_category):
            raise InputError("IoUTally state has a different label_category")
        shapes = {"truth": (self.num_labels,), "intersection": (self.num_units, self.num_labels),
                  "activation": (self.num_units, self.num_categories)}
        for name, shape in shapes.items():
            t = _require(state, name, "IoUTally")
            if tuple(t.shape) != shape:
                raise InputError(f"IoUTally state {name!r} has shape {tuple(t.shape)}, expected {shape}")
            setattr(self, name, t.to(self.device, torch.int64).clone())
        self.images = int(_require(state, "images", "IoUTally"))


_NO_IMAGE = torch.iinfo(torch.int64).max  # index of an empty slot: sorts after every real image
TIEBREAKS = TOP_IMAGE_TIEBREAKS


class TopImages(StreamingStat):
    """Per unit, the k images with the largest score (by default the spatial-max activation), and their raw maps.

    Order: score descending, then (tiebreak="area") a secondary key descending (the
    caller's: the unit's above-threshold mask area in a dissection), then the smaller
    image index. tiebreak="index" ignores the secondary key (ties straight to the
    smaller index). Any sharding followed by `merge` gives the same result as one pass.
    """

    def __init__(self, num_units: int, k: int = 10, device: Any = None, tiebreak: str = "index") -> None:
        if int(num_units) < 1 or int(k) < 1:
            raise InputError(f"num_units and k must be >= 1, got {num_units} and {k}")
        if tiebreak not in TIEBREAKS:
            raise InputError(f"tiebreak must be one of {', '.join(TIEBREAKS)}, got {tiebreak!r}")
        self.num_units = int(num_units)
        self.k = int(k)
        self.tiebreak = tiebreak
        self.device = _device(device)
        self.scores = torch.full((self.num_units, self.k), -math.inf, device=self.device)
        # int64 secondary key per slot (0 under tiebreak="index", where it is never compared)
        self.areas = torch.zeros((self.num_units, self.k), dtype=torch.int64, device=self.device)
        self.indices = torch.full((self.num_units, self.k), _NO_IMAGE, dtype=torch.int64,
                                  device=self.device)
        self.maps: torch.Tensor | None = None  # (U, k, h, w) float32, shaped on the first add

    FORMAT = "dissect.stats.TopImages"
    CONFIG = ("num_units", "k", "tiebreak")

    def empty_like(self) -> "TopImages":
        """A fresh TopImages with this one's units, k, tiebreak and device."""
        return TopImages(self.num_units, self.k, device=self.device, tiebreak=self.tiebreak)

    def to(self, device: Any) -> "TopImages":
        """Move the state to `device` (in place); returns self."""
        self.device = torch.device(device)
        self.scores = self.scores.to(self.device)
        self.areas = self.areas.to(self.device)
        self.indices = self.indices.to(self.device)
        if self.maps is not None:
            self.maps = self.maps.to(self.device)
        return self

    def _order(self, scores: torch.Tensor, areas: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        # (U, k) columns of the k best by (score desc, [area desc,] index asc): stable sorts, last key first
        order = indices.argsort(dim=1, stable=True)
        if self.tiebreak == "area":
            by_area = areas.gather(1, order).argsort(dim=1, descending=True, stable=True)
            order = order.gather(1, by_area)
        by_score = scores.gather(1, order).argsort(dim=1, descending=True, stable=True)[:, :self.k]
        return order.gather(1, by_score)

    def _combine(self, scores: torch.Tensor, areas: torch.Tensor, indices: torch.Tensor,
                 maps: torch.Tensor) -> None:
        # scores/areas/indices (U, k + n), maps (U, k + n, h, w): keep the k best
        pick = self._order(scores, areas, indices)  # (U, k)
        self.scores = scores.gather(1, pick)
        self.areas = areas.gather(1, pick)
        self.indices = indices.gather(1, pick)
        u, _, h, w = maps.shape
        self.maps = maps.gather(1, pick[:, :, None, None].expand(u, self.k, h, w))

    def _empty_maps(self, h: int, w: int) -> torch.Tensor:
        # float32, as the tally saw them: reports threshold these maps with the tally's thresholds
        return torch.zeros(self.num_units, self.k, h, w, dtype=torch.float32, device=self.device)

    def add(self, indices: torch.Tensor, acts: torch.Tensor, areas: torch.Tensor | None = None,
            scores: torch.Tensor | None = None) -> None:
        """Offer a batch: indices (B,) dataset image indices, acts (B, U, h, w).

        `areas` (B, U) integer: the secondary key (needed when tiebreak="area"; ignored
        otherwise). `scores` (B, U): rank by these instead of each map's spatial max.
        """
        if acts.dim() != 4 or acts.shape[1] != self.num_units:
            raise InputError(f"acts must be (B, {self.num_units}, h, w), got {tuple(acts.shape)}")
        if indices.dim() != 1 or indices.shape[0] != acts.shape[0] or indices.is_floating_point():
            raise InputError(f"indices must be an integer (B={acts.shape[0]},) tensor, got "
                             f"{indices.dtype} {tuple(indices.shape)}")
        b, u, h, w = acts.shape
        for name, t in (("areas", areas), ("scores", scores)):
            if t is not None and tuple(t.shape) != (b, u):
                raise InputError(f"{name} must be (B={b}, U={u}), got {tuple(t.shape)}")
        if self.tiebreak == "area" and areas is None:
            raise InputError("TopImages(tiebreak='area').add needs areas (B, U): the secondary key")
        if areas is not None and areas.is_floating_point():
            raise InputError(f"areas must be integer counts, got {areas.dtype}")
        if self.maps is None:
            self.maps = self._empty_maps(h, w)
        elif tuple(self.maps.shape[2:]) != (h, w):
            raise InputError(f"acts maps are {h}x{w}, earlier batches were "
                             f"{self.maps.shape[2]}x{self.maps.shape[3]}")
        if b == 0:
            return
        acts = acts.to(self.device)
        if scores is None:
            new_scores = acts.float().amax(dim=(2, 3)).t()  # (U, B)
        else:
            new_scores = scores.to(self.device, torch.float32).t()
        if self.tiebreak == "area":
            new_areas = areas.to(self.device, torch.int64).t()  # (U, B)
        else:
            new_areas = torch.zeros(u, b, dtype=torch.int64, device=self.device)
        new_idx = indices.to(self.device, torch.int64)[None, :].expand(u, b)
        scores_all = torch.cat([self.scores, new_scores], 1)
        areas_all = torch.cat([self.areas, new_areas], 1)
        indices_all = torch.cat([self.indices, new_idx], 1)
        pick = self._order(scores_all, areas_all, indices_all)  # (U, k) columns of [kept | batch]
        # gather only the k winning maps per unit: no copy of the whole batch
        old = pick < self.k
        units = torch.arange(u, device=self.device)[:, None].expand(u, self.k)
        fresh = acts[(pick - self.k).clamp(min=0), units].to(torch.float32)  # (U, k, h, w)
        kept = self.maps.gather(1, pick.clamp(max=self.k - 1)[:, :, None, None].expand(u, self.k, h, w))
        self.maps = torch.where(old[:, :, None, None], kept, fresh)
        self.scores = scores_all.gather(1, pick)
        self.areas = areas_all.gather(1, pick)
        self.indices = indices_all.gather(1, pick)

    def merge(self, other: "TopImages") -> None:
        """Fold in another shard's top images (same units, k and tiebreak)."""
        self._check_mergeable(other)
        if other.maps is None:
            return
        if self.maps is None:
            self.maps = self._empty_maps(*other.maps.shape[2:])
        if self.maps.shape != other.maps.shape:
            raise InputError("cannot merge TopImages with different map sizes")
        self._combine(torch.cat([self.scores, other.scores.to(self.device)], 1),
                      torch.cat([self.areas, other.areas.to(self.device)], 1),
                      torch.cat([self.indices, other.indices.to(self.device)], 1),
                      torch.cat([self.maps, other.maps.to(self.device)], 1))

    def result(self) -> dict[str, torch.Tensor]:
        """dict(indices (U, k') int64, scores (U, k') float32, areas (U, k') int64, maps (U, k', h, w) float32).

        k' = min(k, images seen); rows in the class's order (score desc, [area desc,] index asc).
        """
        filled = int((self.indices[0] != _NO_IMAGE).sum())
        maps = self.maps if self.maps is not None else self._empty_maps(0, 0)
        return {"indices": self.indices[:, :filled].clone(), "scores": self.scores[:, :filled].clone(),
                "areas": self.areas[:, :filled].clone(), "maps": maps[:, :filled].clone()}

    def state_dict(self) -> dict[str, Any]:
        """Scores, areas, indices and maps (empty (U, k, 0, 0) before the first add)."""
        maps = self.maps if self.maps is not None else self._empty_maps(0, 0)
        return {**self._header(), "scores": self.scores.clone(), "areas": self.areas.clone(),
                "indices": self.indices.clone(), "maps": maps.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state written by `state_dict` (num_units, k and tiebreak must match).

        A state of an earlier version (no tiebreak or areas) is refused with an InputError.
        """
        self._check_state(state)
        shape = (self.num_units, self.k)
        for name in ("scores", "areas", "indices"):
            t = _require(state, name, "TopImages")
            if tuple(t.shape) != shape:
                raise InputError(f"TopImages state {name!r} has shape {tuple(t.shape)}, expected {shape}")
        self.scores = state["scores"].to(self.device, torch.float32).clone()
        self.areas = state["areas"].to(self.device, torch.int64).clone()
        self.indices = state["indices"].to(self.device, torch.int64).clone()
        maps = _require(state, "maps", "TopImages").to(self.device, torch.float32)
        self.maps = maps.clone() if maps.shape[2] * maps.shape[3] > 0 else None
