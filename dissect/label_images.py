"""Per (image, unit): the intersection of the unit's mask with the unit's own label.

Ranks the "label strip" of a unit (its top images by intersection with the top label
that labels.label_units chose), counted the way IoUTally counts I[u, l]: the mask
`upsample(act) > T` at the label size, one count per label layer holding l at an
on-pixel, plus |mask| for each image-level label l of the image. Summed over every
image it is exactly the tally's intersection[u, top_label[u]].
"""
from __future__ import annotations

from typing import Iterable

import torch

from broden.errors import InputError
from dissect.upsample import mask_pixels

__all__ = ["LabelStripBatch", "label_intersections", "label_intersections_from_pixels"]


class LabelStripBatch:
    """One batch's labels prepared once for `label_intersections` of every layer.

    labels (B, K, sh, sw) global ids, image_labels (B, M) ids (0 = padding); `num_labels`
    bounds the ids (the dataset's label count; None: read from the data, a host sync on CUDA).
    """

    def __init__(self, labels: torch.Tensor, image_labels: torch.Tensor, num_labels: int | None = None,
                 device: torch.device | str | None = None) -> None:
        if labels.dim() != 4 or image_labels.dim() != 2 or image_labels.shape[0] != labels.shape[0]:
            raise InputError(f"label strips need labels (B, K, sh, sw) and image_labels (B, M) of one batch; got "
                             f"{tuple(labels.shape)} and {tuple(image_labels.shape)}")
        dev = labels.device if device is None else torch.device(device)
        b, k, sh, sw = labels.shape
        self.b, self.k, self.p, self.size = b, k, sh * sw, (int(sh), int(sw))
        pixel_ids = labels.to(dev).reshape(b, k * self.p).long()
        self.ids = image_labels.to(dev, torch.int64)  # (B, M)
        if num_labels is None:
            num_labels = max((int(t.max()) for t in (pixel_ids, self.ids) if t.numel()), default=0) + 1
        # which ids occur in each image: the only (image, unit) pairs whose intersection can be above 0
        self.occurs = torch.zeros(b, int(num_labels), dtype=torch.bool, device=dev)
        self.occurs.scatter_(1, pixel_ids, True)
        self.occurs.scatter_(1, self.ids, True)
        self.occurs[:, 0] = False  # id 0: unlabeled pixels and padding, never a unit's label
        self.by_pixel = pixel_ids.view(b, k, self.p).permute(0, 2, 1).reshape(b * self.p, k)  # (B*P, K)


def label_intersections(acts: torch.Tensor, thresholds: torch.Tensor, labels: torch.Tensor | LabelStripBatch,
                        image_labels: torch.Tensor | None, unit_labels: torch.Tensor, upsample: str = "torch",
                        chunk_elements: int = 1 << 22) -> torch.Tensor:
    """(B, U) int64: per image, |mask_u ∩ unit_labels[u]| as IoUTally counts it (0 for label id 0).

    acts (B, U, h, w), thresholds (U,) (dtype kept, as the tally compares them), unit_labels
    (U,) ids; `labels` (B, K, sh, sw) with `image_labels` (B, M), or a LabelStripBatch (then
    image_labels None). Sparse twice over: only the (image, unit) pairs whose label occurs in
    the image are upsampled (the others count 0: on Broden an image holds a few dozen of the
    labels), and of those only the on-pixels of the masks are visited (`upsample.mask_pixels`).
    """
    if not isinstance(labels, LabelStripBatch):
        if image_labels is None:
            raise InputError("label_intersections: image_labels (B, M) are needed with a labels tensor")
        labels = LabelStripBatch(labels, image_labels, device=acts.device)
    batch = labels
    if acts.dim() != 4:
        raise InputError(f"label_intersections needs acts (B, U, h, w); got {tuple(acts.shape)}")
    b, u = acts.shape[:2]
    if batch.b != b or tuple(unit_labels.shape) != (u,):
        raise InputError(f"label_intersections: labels for {batch.b} images, unit_labels "
                         f"{tuple(unit_labels.shape)}; acts are for {b} images of {u} units")
    dev = acts.device
    bi, ui, pair_want = _pairs(batch, unit_labels.to(dev, torch.int64))
    # the pairs as the "units" of one image: mask_pixels' rows are then pair numbers
    chunks = mask_pixels(acts[bi, ui].unsqueeze(0), thresholds.to(dev)[ui], batch.size, chunk_elements,
                         mode=upsample)
    return _count(chunks, batch, bi, ui, pair_want, u)


def label_intersections_from_pixels(rows: torch.Tensor, pix: torch.Tensor, batch: LabelStripBatch,
                                    units: int, unit_labels: torch.Tensor) -> torch.Tensor:
    """(B, U) int64: `label_intersections` from the masks' on-pixels, rows (n,) b * U + u, pix (n,) y * sw + x.

    The pixels are those `upsample.mask_pixels` yields for the batch's (B, U, h, w) maps (as
    stage 2 found them, dissect.mask_store), so the counts are the same.
    """
    b, u = batch.b, int(units)
    if tuple(unit_labels.shape) != (u,) or rows.shape != pix.shape:
        raise InputError(f"label_intersections_from_pixels: unit_labels {tuple(unit_labels.shape)} for {u} units, "
                         f"rows {tuple(rows.shape)} and pix {tuple(pix.shape)} must match")
    dev = rows.device
    bi, ui, pair_want = _pairs(batch, unit_labels.to(dev, torch.int64))
    pair_of_row = torch.full((b * u,), -1, dtype=torch.int64, device=dev)
    pair_of_row[bi * u + ui] = torch.arange(bi.numel(), device=dev)
    pair = pair_of_row[rows]
    on = torch.nonzero(pair >= 0).squeeze(1)  # the pixels of pairs whose label occurs in the image
    return _count([(pair.index_select(0, on), pix.index_select(0, on))], batch, bi, ui, pair_want, u)


def _pairs(batch: LabelStripBatch, want: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image, unit, label) (n,) each: the (image, unit) pairs whose unit's label occurs in the image."""
    known = want < batch.occurs.shape[1]  # an id past every label the batch can hold occurs nowhere
    present = batch.occurs[:, torch.where(known, want, 0)] & known[None, :]  # (B, U)
    bi, ui = torch.nonzero(present, as_tuple=True)  # (n,) the pairs that can intersect
    return bi, ui, want[ui]


def _count(chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], batch: LabelStripBatch, bi: torch.Tensor,
           ui: torch.Tensor, pair_want: torch.Tensor, u: int) -> torch.Tensor:
    """(B, U) intersections from on-pixels (pair number, pix) of the pairs (bi, ui) with labels pair_want."""
    n, dev = bi.numel(), bi.device
    hits = torch.zeros(n, dtype=torch.int64, device=dev)
    area = torch.zeros(n, dtype=torch.int64, device=dev)
    for rows, pix in chunks:
        area += torch.bincount(rows, minlength=n)
        if batch.k:
            lab = batch.by_pixel[bi[rows] * batch.p + pix]  # (m, K)
            hits.index_add_(0, rows, (lab == pair_want[rows][:, None]).sum(dim=1))
    if batch.ids.numel():
        hits += (batch.ids[bi] == pair_want[:, None]).sum(dim=1) * area
    inter = torch.zeros(batch.b * u, dtype=torch.int64, device=dev)
    inter[bi * u + ui] = hits
    return inter.view(batch.b, u)
