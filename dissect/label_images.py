"""Per (image, unit): the intersection of the unit's mask with the unit's own label.

Ranks the "label strip" of a unit (its top images by intersection with the top label
that labels.label_units chose), counted the way IoUTally counts I[u, l]: the mask
`upsample(act) > T` at the label size, one count per label layer holding l at an
on-pixel, plus |mask| for each image-level label l of the image. Summed over every
image it is exactly the tally's intersection[u, top_label[u]].
"""
from __future__ import annotations

import torch

from broden.errors import InputError
from dissect.upsample import mask_pixels

__all__ = ["LabelStripBatch", "label_intersections"]


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
    want = unit_labels.to(dev, torch.int64)  # (U,)
    inter = torch.zeros(b * u, dtype=torch.int64, device=dev)
    known = want < batch.occurs.shape[1]  # an id past every label the batch can hold occurs nowhere
    present = batch.occurs[:, torch.where(known, want, 0)] & known[None, :]  # (B, U)
    bi, ui = torch.nonzero(present, as_tuple=True)  # (n,) the pairs that can intersect
    n = bi.numel()
    if n == 0:
        return inter.view(b, u)
    pair_want = want[ui]
    hits = torch.zeros(n, dtype=torch.int64, device=dev)
    area = torch.zeros(n, dtype=torch.int64, device=dev)
    # the pairs as the "units" of one image: mask_pixels' rows are then pair numbers
    for rows, pix in mask_pixels(acts[bi, ui].unsqueeze(0), thresholds.to(dev)[ui], batch.size, chunk_elements,
                                 mode=upsample):
        area += torch.bincount(rows, minlength=n)
        if batch.k:
            lab = batch.by_pixel[bi[rows] * batch.p + pix]  # (m, K)
            hits.index_add_(0, rows, (lab == pair_want[rows][:, None]).sum(dim=1))
    if batch.ids.numel():
        hits += (batch.ids[bi] == pair_want[:, None]).sum(dim=1) * area
    inter[bi * u + ui] = hits
    return inter.view(b, u)
