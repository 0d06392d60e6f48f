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
    Sparse: only the on-pixels of the masks are visited (`upsample.mask_pixels`).
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
    by_pixel = labels.to(dev).reshape(b, k, p).permute(0, 2, 1).reshape(b * p, k)  # (B*P, K)
    inter = torch.zeros(b * u, dtype=torch.int64, device=dev)
    area = torch.zeros(b * u, dtype=torch.int64, device=dev)
    for rows, pix in mask_pixels(acts, thresholds.to(dev), (sh, sw), chunk_elements, mode=upsample):
        area += torch.bincount(rows, minlength=b * u)
        if k:
            lab = by_pixel[(rows // u) * p + pix].long()  # (n, K)
            hits = (lab == want[rows % u][:, None]).sum(dim=1)  # label layers holding the unit's label
            inter.index_add_(0, rows, hits)
    inter = inter.view(b, u)
    if image_labels.numel():
        occurs = (image_labels.to(dev, torch.int64)[:, None, :] == want[None, :, None]).sum(dim=2)  # (B, U)
        inter += occurs * area.view(b, u)
    return torch.where((want > 0)[None, :], inter, torch.zeros_like(inter))
