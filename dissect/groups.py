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

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from broden.errors import InputError
from dissect.labels import LayerLabels

__all__ = ["GroupSpec", "layout_from_spec", "equal_groups", "group_of_units", "conv_module", "module_of_type",
           "find_following_bn", "following_bn", "group_norms", "group_norms_bn", "group_relevance", "concept_groups"]


def _where(layer: str | None) -> str:
    return f"layer {layer!r}" if layer else "group config"


@dataclass(frozen=True)
class GroupSpec:
    """G groups of f = (channels - free) // G contiguous filters from channel 0, then `free` free filters.

    The one description of a layer's groups, for training (the losses) and for
    dissection (concept groups). `free=None` makes the free filters the
    remainder of channels // groups; it is resolved at construction, so
    `.free` is always an int. `layer` only names the layer in error messages.
    """

    channels: int
    groups: int
    free: int | None = None
    layer: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        where = _where(self.layer)
        for key in ("channels", "groups"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{where}: '{key}' must be a positive integer, got {value!r}")
        if self.free is None:
            free = self.channels % self.groups
        else:
            free = self.free
            if isinstance(free, bool) or not isinstance(free, int) or free < 0:
                raise InputError(f"{where}: 'free' must be a non-negative integer, got {free!r}")
            if (self.channels - free) % self.groups != 0:
                raise InputError(
                    f"{where}: channels - free = {self.channels} - {free} = {self.channels - free} "
                    f"is not divisible by groups = {self.groups} ({self.groups} groups do not divide "
                    f"{self.channels - free} grouped channels); choose 'free' so that it is")
        if self.channels - free < self.groups:
            raise InputError(
                f"{where}: {self.groups} groups need at least one filter each, but only "
                f"{self.channels - free} of {self.channels} channels are grouped (free = {free})")
        object.__setattr__(self, "free", free)

    @property
    def size(self) -> int:
        """f: filters per group."""
        return (self.channels - self.free) // self.groups

    @property
    def grouped(self) -> int:
        """G * f: the number of grouped channels (channels 0 .. G*f - 1)."""
        return self.groups * self.size

    def units(self, g: int) -> list[int]:
        """Channel indices of group g."""
        return list(range(g * self.size, (g + 1) * self.size))

    def group_slices(self) -> list[slice]:
        """The channel slice of each group, in order."""
        f = self.size
        return [slice(g * f, (g + 1) * f) for g in range(self.groups)]

    def index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """LongTensor (G, f): the channel indices of each group."""
        return torch.arange(self.grouped, dtype=torch.int64, device=device).view(self.groups, self.size)

    def to_dict(self) -> dict[str, int]:
        """The checkpoint's `groups` entry: {"groups", "free", "channels"}."""
        return {"groups": self.groups, "free": int(self.free), "channels": self.channels}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], layer: str | None = None) -> "GroupSpec":
        """Inverse of `to_dict`; `free` may be missing or None (the remainder)."""
        if not isinstance(data, Mapping):
            raise InputError(f"{_where(layer)}: expected a dict with 'groups' and 'channels', got {data!r}")
        for key in ("groups", "channels"):
            if key not in data:
                raise InputError(f"{_where(layer)}: missing field {key!r} (expected 'groups', 'channels', "
                                 f"optional 'free')")
        unknown = set(data) - {"groups", "free", "channels"}
        if unknown:
            raise InputError(f"{_where(layer)}: unknown field(s) {sorted(unknown)} (expected 'groups', "
                             f"'channels', optional 'free')")
        return cls(channels=data["channels"], groups=data["groups"], free=data.get("free"), layer=layer)


def layout_from_spec(spec: Mapping[str, Any], channels: int, layer: str = "?") -> GroupSpec:
    """The groups of a checkpoint entry {"groups", "free"?, "channels"?} on a layer of `channels` channels."""
    declared = spec.get("channels")
    if declared is not None and int(declared) != channels:
        raise InputError(f"groups of layer {layer}: declared for {declared} channels, the layer has {channels}")
    return GroupSpec.from_dict({**spec, "channels": channels}, layer)


def equal_groups(channels: int, groups: int, layer: str = "?") -> GroupSpec:
    """`--groups G`: G equal contiguous blocks; the remainder channels are free."""
    return GroupSpec(channels, groups, None, layer)


def group_of_units(spec: GroupSpec) -> np.ndarray:
    """(C,) int64 group index of each channel, -1 for free channels."""
    out = np.full(spec.channels, -1, dtype=np.int64)
    out[: spec.grouped] = np.repeat(np.arange(spec.groups), spec.size)
    return out


def module_of_type(model: nn.Module, name: str, kind: type[nn.Module], role: str) -> Any:
    """The module named `name` in `model`, which must be a `kind`; InputError (starting with `role`)
    listing the modules of that kind when it is not one."""
    module = dict(model.named_modules()).get(name)
    if not isinstance(module, kind):
        valid = [n for n, m in model.named_modules() if isinstance(m, kind)]
        what = "no module" if module is None else f"a {type(module).__name__}, not a {kind.__name__}"
        raise InputError(f"{role}: {what} of that name in {type(model).__name__}; "
                         f"valid {kind.__name__} layers: {', '.join(valid) or '(none)'}")
    return module


def conv_module(model: nn.Module, name: str) -> nn.Conv2d:
    """The Conv2d named `name` in `model`; InputError listing the conv layers when it is not one."""
    return module_of_type(model, name, nn.Conv2d, f"grouped layer {name!r}")


def find_following_bn(model: nn.Module, conv_name: str) -> str | None:
    """Dotted name of the BatchNorm2d that directly follows conv `conv_name`, else None.

    Only a parent nn.Sequential says what runs next (in any other module the order
    of children is only declaration order), and the BN must have the conv's
    channel count. `conv_name` must name a Conv2d (InputError listing them).
    """
    conv = conv_module(model, conv_name)
    modules = dict(model.named_modules())
    parent_name, _, child = conv_name.rpartition(".")
    parent = modules[parent_name]
    if not isinstance(parent, nn.Sequential):
        return None
    keys = list(parent._modules.keys())
    position = keys.index(child)
    if position + 1 >= len(keys):
        return None
    following = parent._modules[keys[position + 1]]
    if isinstance(following, nn.BatchNorm2d) and following.num_features == conv.out_channels:
        return f"{parent_name}.{keys[position + 1]}" if parent_name else keys[position + 1]
    return None


def following_bn(model: nn.Module, conv_name: str) -> nn.BatchNorm2d | None:
    """The BatchNorm2d module that directly follows conv `conv_name` (find_following_bn's rule), else None."""
    name = find_following_bn(model, conv_name)
    return None if name is None else dict(model.named_modules())[name]


def group_norms(weight: torch.Tensor, spec: GroupSpec) -> torch.Tensor:
    """beta_gl = |w_gl|_F per group (CGL eq. 7): (G,), differentiable, in the weight's dtype (half upcast).

    Free filters are excluded. A zero group has norm 0 and a zero (not NaN) gradient.
    """
    if weight.shape[0] != spec.channels:
        raise InputError(f"{'layer ' + repr(spec.layer) if spec.layer else 'weight'}: {weight.shape[0]} "
                         f"output channels, group config says {spec.channels}")
    w = weight[: spec.grouped].reshape(spec.groups, -1)  # (G, f * Cin * kh * kw)
    if w.dtype in (torch.float16, torch.bfloat16):
        w = w.float()
    sq = (w * w).sum(dim=1)
    pos = sq > 0
    return torch.where(pos, torch.where(pos, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def group_norms_bn(weight: torch.Tensor, spec: GroupSpec, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Gamma-aware relevance (G,): |w_i * |gamma_i| / sqrt(running_var_i + bn.eps)|_F over each group.

    A conv followed by BN is scale-invariant in its weights; w_i * gamma_i /
    sqrt(var_i + eps) is the effective filter of the conv+BN pair at inference.
    gamma = 1 without affine; running_var = 1 without running statistics.
    """
    c = weight.shape[0]
    if bn.num_features != c:
        raise InputError(f"group relevance: batch-norm has {bn.num_features} features, weight has {c} filters")
    w = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
    # the factor in the weight's dtype and device: float64 results for float64 weights
    gamma = bn.weight.to(w) if bn.weight is not None else w.new_ones(c)
    var = bn.running_var.to(w) if bn.running_var is not None else w.new_ones(c)
    factor = gamma.abs() / torch.sqrt(var + bn.eps)  # (C,)
    return group_norms(w * factor.view(-1, *([1] * (weight.dim() - 1))), spec)


def group_relevance(weight: torch.Tensor, spec: GroupSpec,
                    bn: nn.BatchNorm2d | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(beta (G,), beta_bn (G,) or None) in float64, for results: group_norms and group_norms_bn of `weight`."""
    w = weight.detach().to(torch.float64).cpu()
    with torch.no_grad():
        beta = group_norms(w, spec).numpy()
        beta_bn = group_norms_bn(w, spec, bn).numpy() if bn is not None else None
    return beta, beta_bn


def concept_groups(labels: LayerLabels, iou: np.ndarray, label_category: np.ndarray,
                   label_names: list[str], layout: GroupSpec, beta: np.ndarray | None = None,
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
