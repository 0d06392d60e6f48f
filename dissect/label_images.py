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

__all__ = ["label_intersections"]


def label_intersections(acts: torch.Tensor, thresholds: torch.Tensor, labels: torch.Tensor,
                        image_labels: torch.Tensor, unit_labels: torch.Tensor, upsample: str = "torch",
                        chunk_elements: int = 1 << 22) -> torch.Tensor:
    """(B, U) int64: per image, |mask_u ∩ unit_labels[u]| as IoUTally counts it (0 for label id 0).

    acts (B, U, h, w), thresholds (U,) (dtype kept, as the tally compares them), labels
    (B, K, sh, sw) global ids, image_labels (B, M) ids (0 = padding), unit_labels (U,) ids.
    Sparse twice over: only the (image, unit) pairs whose label occurs in the image are
    upsampled (the others count 0: on Broden an image holds a few dozen of the labels), and of
    those only the on-pixels of the masks are visited (`upsample.mask_pixels`).
    """
    if acts.dim() != 4 or labels.dim() != 4 or image_labels.dim() != 2:
        raise InputError(f"label_intersections needs acts (B, U, h, w), labels (B, K, sh, sw) and image_labels "
                         f"(B, M); got {tuple(acts.shape)}, {tuple(labels.shape)}, {tuple(image_labels.shape)}")
    b, u = acts.shape[:2]
    if labels.shape[0] != b or image_labels.shape[0] != b or tuple(unit_labels.shape) != (u,):
        raise InputError(f"label_intersections: labels for {labels.shape[0]} images, image_labels for "
                         f"{image_labels.shape[0]}, unit_labels {tuple(unit_labels.shape)}; acts are for {b} "
                         f"images of {u} units")
    dev = acts.device
    k, sh, sw = labels.shape[1], labels.shape[2], labels.shape[3]
    p = sh * sw
    want = unit_labels.to(dev, torch.int64)  # (U,)
    pixel_ids = labels.to(dev).reshape(b, k * p).long()
    ids = image_labels.to(dev, torch.int64)
    inter = torch.zeros(b * u, dtype=torch.int64, device=dev)
    if b == 0 or u == 0:
        return inter.view(b, u)
    # which ids occur in each image: one bool row per image, as wide as the largest id seen
    width = int(torch.stack([pixel_ids.max() if pixel_ids.numel() else want.new_zeros(()),
                             ids.max() if ids.numel() else want.new_zeros(()), want.max()]).max()) + 1
    occurs = torch.zeros(b, width, dtype=torch.bool, device=dev)
    occurs.scatter_(1, pixel_ids, True)
    occurs.scatter_(1, ids, True)
    occurs[:, 0] = False  # id 0: unlabeled pixels and padding, never a unit's label
    bi, ui = torch.nonzero(occurs[:, want], as_tuple=True)  # (P,) the pairs that can intersect
    n = bi.numel()
    if n == 0:
        return inter.view(b, u)
    pair_want = want[ui]
    by_pixel = pixel_ids.view(b, k, p).permute(0, 2, 1).reshape(b * p, k)  # (B*P, K)
    hits = torch.zeros(n, dtype=torch.int64, device=dev)
    area = torch.zeros(n, dtype=torch.int64, device=dev)
    # the pairs as the "units" of one image: mask_pixels' rows are then pair numbers
    for rows, pix in mask_pixels(acts[bi, ui].unsqueeze(0), thresholds.to(dev)[ui], (sh, sw), chunk_elements,
                                 mode=upsample):
        area += torch.bincount(rows, minlength=n)
        if k:
            lab = by_pixel[bi[rows] * p + pix]  # (m, K)
            hits.index_add_(0, rows, (lab == pair_want[rows][:, None]).sum(dim=1))
    if ids.numel():
        hits += (ids[bi] == pair_want[:, None]).sum(dim=1) * area
    inter[bi * u + ui] = hits
    return inter.view(b, u)
