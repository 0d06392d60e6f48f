"""Concept groups per conv layer, and hooks that capture their pre-activation maps.

A layer's F output channels are split into G contiguous blocks of f filters
starting at channel 0; the remaining channels are "free" filters that take part
in no group loss and no block norm (design/cgl.md, "Groups").
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from broden.errors import InputError

__all__ = ["GroupSpec", "LayerGroups", "Captured", "GroupActivations", "find_following_bn",
           "conv_names", "build_layer_groups", "layer_groups_config"]

log = logging.getLogger(__name__)


def _where(layer: str | None) -> str:
    return f"layer {layer!r}" if layer else "group config"


@dataclass(frozen=True)
class GroupSpec:
    """G groups of f = (channels - free) // G contiguous filters, then `free` free filters.

    `free=None` makes the free filters the remainder of channels // groups; it is
    resolved at construction, so `.free` is always an int. `layer` only names the
    layer in error messages.
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
                    f"is not divisible by groups = {self.groups}; choose 'free' so that it is")
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


@dataclass
class LayerGroups:
    """A grouped conv layer: its dotted module name, its groups and, optionally, the BN after it."""

    name: str  # dotted conv module name, e.g. "features.3"
    spec: GroupSpec
    bn: str | None = None  # dotted name of the BatchNorm2d right after the conv (BN variant of psi)


@dataclass
class Captured:
    """One grouped layer's capture from the last forward pass."""

    pre: torch.Tensor  # (N, C, H, W): conv output, or the BN output when a BN follows
    gamma: torch.Tensor | None  # (C,): that BN's weight (ones if not affine); None without BN


def conv_names(model: nn.Module) -> list[str]:
    """Dotted names of every Conv2d in `model`."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _bn_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def _get_conv(model: nn.Module, name: str) -> nn.Conv2d:
    modules = dict(model.named_modules())
    module = modules.get(name)
    if not isinstance(module, nn.Conv2d):
        what = "no module" if module is None else f"a {type(module).__name__}, not a Conv2d"
        raise InputError(f"grouped layer {name!r}: {what} of that name in {type(model).__name__}; "
                         f"valid conv layers: {', '.join(conv_names(model)) or '(none)'}")
    return module


def _get_bn(model: nn.Module, name: str, conv_name: str) -> nn.BatchNorm2d:
    module = dict(model.named_modules()).get(name)
    if not isinstance(module, nn.BatchNorm2d):
        what = "no module" if module is None else f"a {type(module).__name__}, not a BatchNorm2d"
        raise InputError(f"batch-norm {name!r} of grouped layer {conv_name!r}: {what} of that name; "
                         f"valid BatchNorm2d layers: {', '.join(_bn_names(model)) or '(none)'}")
    return module


def find_following_bn(model: nn.Module, conv_name: str) -> str | None:
    """The BatchNorm2d directly after conv `conv_name` in its parent Sequential, else None."""
    conv = _get_conv(model, conv_name)
    parent_name, _, child = conv_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
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


def build_layer_groups(model: nn.Module, config: Mapping[str, Mapping[str, Any]],
                       use_bn: bool = True) -> list[LayerGroups]:
    """LayerGroups from a checkpoint-style config {conv name: {"groups", "free"?, "channels"?}}.

    `channels` defaults to the conv's out_channels and must match it when given.
    With `use_bn`, a BatchNorm2d directly after the conv selects the BN variant of psi.
    """
    result = []
    for name, entry in config.items():
        conv = _get_conv(model, name)
        entry = dict(entry)
        entry.setdefault("channels", conv.out_channels)
        spec = GroupSpec.from_dict(entry, layer=name)
        if spec.channels != conv.out_channels:
            raise InputError(f"layer {name!r}: group config says {spec.channels} channels, "
                             f"the conv has {conv.out_channels}")
        bn = find_following_bn(model, name) if use_bn else None
        result.append(LayerGroups(name=name, spec=spec, bn=bn))
    return result


def layer_groups_config(layers: Iterable[LayerGroups]) -> dict[str, dict[str, int]]:
    """The checkpoint's `groups` field for these layers."""
    return {lg.name: lg.spec.to_dict() for lg in layers}


class GroupActivations:
    """Context manager: forward hooks that capture each grouped layer's pre-activation map.

    Hooks the conv (or the BN that follows it, when `LayerGroups.bn` is set) so
    any model works without returning feature maps. With `copy=True` the capture
    is a (differentiable) clone: torchvision's AlexNet/VGG apply ReLU(inplace=True)
    right after the conv, which would otherwise overwrite the captured map.
    With `copy=False`, reading a map that was modified in place raises.
    Set `.enabled = False` to skip capturing (e.g. during validation).
    """

    def __init__(self, model: nn.Module, layers: Sequence[LayerGroups], copy: bool = True) -> None:
        self.model = model
        self.layers = list(layers)
        self.copy = copy
        self.enabled = True
        self._captured: dict[str, Captured] = {}
        self._versions: dict[str, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # validate every name up front, so nothing is half attached on error
        self._targets: list[tuple[str, nn.Module, nn.BatchNorm2d | None]] = []
        for lg in self.layers:
            conv = _get_conv(model, lg.name)
            if lg.spec.channels != conv.out_channels:
                raise InputError(f"layer {lg.name!r}: group config says {lg.spec.channels} channels, "
                                 f"the conv has {conv.out_channels}")
            bn = _get_bn(model, lg.bn, lg.name) if lg.bn is not None else None
            if bn is not None and bn.num_features != conv.out_channels:
                raise InputError(f"batch-norm {lg.bn!r} has {bn.num_features} features, conv "
                                 f"{lg.name!r} has {conv.out_channels} channels")
            self._targets.append((lg.name, bn if bn is not None else conv, bn))

    def _hook(self, name: str, bn: nn.BatchNorm2d | None):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if not self.enabled:
                return
            pre = output.clone() if self.copy else output
            gamma = None
            if bn is not None:
                gamma = bn.weight if bn.weight is not None else torch.ones(
                    bn.num_features, device=output.device, dtype=output.dtype)
            self._captured[name] = Captured(pre=pre, gamma=gamma)
            self._versions[name] = pre._version
        return hook

    def __enter__(self) -> "GroupActivations":
        try:
            for name, module, bn in self._targets:
                self._handles.append(module.register_forward_hook(self._hook(name, bn)))
            log.debug("capturing pre-activations of %s", [name for name, _, _ in self._targets])
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        """Detach every hook and drop the captures."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def clear(self) -> None:
        """Drop the captures (and the graph they hold)."""
        self._captured.clear()
        self._versions.clear()

    @property
    def captured(self) -> dict[str, Captured]:
        """Conv name -> Captured, from the last forward pass."""
        for name, cap in self._captured.items():
            if cap.pre._version != self._versions[name]:
                raise RuntimeError(f"the map captured at {name!r} was modified in place after the "
                                   f"forward hook (an inplace ReLU?); use GroupActivations(copy=True)")
        return dict(self._captured)
