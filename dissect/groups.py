"""Concept groups of a dissected layer (CGL paper section 4, ../shared/design/cgl.md).

Groups are contiguous blocks of f = (C - free) // G channels from channel 0; the
remaining `free` channels belong to no group (the checkpoint's convention).

Relevance beta_gl = ||w_g||_F, the Frobenius norm of the group's conv filters (all
input channels and kernel positions). When a BatchNorm2d directly follows the conv,
the conv weights are scale-invariant, so we also report
    relevance_bn = || w_g * |gamma_g| / sqrt(running_var_g + eps) ||_F
(each filter scaled by its BN gain, i.e. the weight of the folded conv+BN).

Aligned concept: for every label c of the selected categories,
    score_c = alpha * (detectors of c in the group / group size) + (1 - alpha) * mean_u IoU[u, c]
and the group is aligned to argmax_c score_c (ties: smallest id) when score >= T.
Defaults alpha = 0.5, T = 0.3 (DissectConfig.group_alpha / group_threshold): the paper
chose T by hand and does not print it; 0.3 asks for e.g. half of the group detecting c
with a mean IoU of 0.1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from broden.errors import InputError
from dissect.labels import LayerLabels

__all__ = ["GroupLayout", "layout_from_spec", "equal_groups", "group_of_units", "following_bn",
           "group_relevance", "concept_groups"]


@dataclass(frozen=True)
class GroupLayout:
    """G contiguous groups of `size` channels starting at channel 0, then `free` ungrouped ones."""

    channels: int
    groups: int
    size: int

    @property
    def free(self) -> int:
        """Channels outside every group."""
        return self.channels - self.groups * self.size

    def units(self, g: int) -> list[int]:
        """Channel indices of group g."""
        return list(range(g * self.size, (g + 1) * self.size))


def layout_from_spec(spec: dict[str, Any], channels: int, layer: str = "?") -> GroupLayout:
    """Layout from a checkpoint entry {"groups", "free", "channels"}; checks it fits the layer."""
    groups = int(spec["groups"])
    declared = spec.get("channels")
    if declared is not None and int(declared) != channels:
        raise InputError(f"groups of layer {layer}: declared for {declared} channels, the layer has {channels}")
    free = spec.get("free")
    free = channels % groups if free is None else int(free)
    if groups < 1 or free < 0 or (channels - free) % groups or channels - free < groups:
        raise InputError(f"groups of layer {layer}: {groups} groups with {free} free channels "
                         f"do not divide {channels} channels")
    return GroupLayout(channels, groups, (channels - free) // groups)


def equal_groups(channels: int, groups: int, layer: str = "?") -> GroupLayout:
    """`--groups G`: G equal contiguous blocks; the remainder channels are free."""
    return layout_from_spec({"groups": groups, "free": None}, channels, layer)


def group_of_units(layout: GroupLayout) -> np.ndarray:
    """(C,) int64 group index of each channel, -1 for free channels."""
    out = np.full(layout.channels, -1, dtype=np.int64)
    out[: layout.groups * layout.size] = np.repeat(np.arange(layout.groups), layout.size)
    return out


def following_bn(model: nn.Module, conv_name: str) -> nn.BatchNorm2d | None:
    """The BatchNorm2d right after `conv_name` among its parent's children, if any."""
    parent_name, _, child = conv_name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        return None
    names = [n for n, _ in parent.named_children()]
    if child not in names:
        return None
    i = names.index(child)
    if i + 1 < len(names):
        nxt = getattr(parent, names[i + 1])
        if isinstance(nxt, nn.BatchNorm2d):
            return nxt
    return None


def group_relevance(weight: torch.Tensor, layout: GroupLayout,
                    bn: nn.BatchNorm2d | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(beta (G,), beta_bn (G,) or None): Frobenius norms of each group's filters (see module doc)."""
    w = weight.detach().to(torch.float64).reshape(weight.shape[0], -1)  # (C, in*kh*kw)
    n = layout.groups * layout.size
    per_filter = (w[:n] ** 2).sum(dim=1).reshape(layout.groups, layout.size)  # (G, f)
    beta = per_filter.sum(dim=1).sqrt().cpu().numpy()
    beta_bn = None
    if bn is not None and bn.running_var is not None:
        if bn.weight is not None:
            gamma = bn.weight.detach().to(torch.float64).cpu()
        else:  # affine=False: gamma is 1
            gamma = torch.ones(weight.shape[0], dtype=torch.float64)
        scale = gamma.abs() / torch.sqrt(bn.running_var.detach().to(torch.float64).cpu() + bn.eps)  # (C,)
        scaled = per_filter.cpu() * (scale[:n] ** 2).reshape(layout.groups, layout.size)
        beta_bn = scaled.sum(dim=1).sqrt().numpy()
    return beta, beta_bn


def concept_groups(labels: LayerLabels, iou: np.ndarray, label_category: np.ndarray,
                   label_names: list[str], layout: GroupLayout, beta: np.ndarray | None = None,
                   beta_bn: np.ndarray | None = None, alpha: float = 0.5,
                   threshold: float = 0.3) -> list[dict[str, Any]]:
    """Per group: units, relevance, aligned concept and score, detectors per label (summary.json form).

    `iou` (U, L) by global id; `label_category` (L,) index into labels.categories, -1 outside.
    """
    if layout.channels != labels.num_units:
        raise InputError(f"group layout for {layout.channels} channels, layer has {labels.num_units} units")
    iou = np.asarray(iou, dtype=np.float64)
    label_category = np.asarray(label_category, dtype=np.int64)
    G, f, L = layout.groups, layout.size, iou.shape[1]
    n = G * f
    # detectors per (group, top label), counted by a flat bincount
    det = labels.detector[:n].reshape(G, f)
    top = labels.top_label[:n].reshape(G, f)
    flat = (np.arange(G)[:, None] * L + top)[det]
    det_counts = np.bincount(flat, minlength=G * L).reshape(G, L)  # (G, L)
    mean_iou = iou[:n].reshape(G, f, L).mean(axis=1)  # (G, L)
    score = alpha * det_counts / f + (1 - alpha) * mean_iou
    valid = label_category >= 0
    score = np.where(valid[None, :], score, -np.inf)
    best = score.argmax(axis=1)  # ties: smallest id
    out = []
    for g in range(G):  # one entry per group: a handful, not a hot path
        c = int(best[g])
        s = float(score[g, c]) if np.isfinite(score[g, c]) else 0.0
        aligned = bool(valid.any()) and s >= threshold
        ids = np.flatnonzero(det_counts[g])
        out.append({
            "index": g,
            "units": layout.units(g),
            "relevance": None if beta is None else float(beta[g]),
            "relevance_bn": None if beta_bn is None else float(beta_bn[g]),
            "aligned_concept": label_names[c] if aligned else None,
            "aligned_category": labels.categories[label_category[c]] if aligned else None,
            "score": s,
            "detectors": {label_names[i]: int(det_counts[g, i]) for i in ids},
        })
    return out
