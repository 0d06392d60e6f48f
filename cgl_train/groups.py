"""Concept groups per conv layer, and hooks that capture their pre-activation maps.

A layer's F output channels are split into G contiguous blocks of f filters
starting at channel 0; the remaining channels are "free" filters that take part
in no group loss and no block norm (design/cgl.md, "Groups").
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from broden.errors import InputError
from dissect.groups import GroupSpec, conv_module, find_following_bn, module_of_type

__all__ = ["GroupSpec", "LayerGroups", "Captured", "GroupActivations", "find_following_bn",
           "build_layer_groups", "layer_groups_config"]

log = logging.getLogger(__name__)


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


def _get_bn(model: nn.Module, name: str, conv_name: str) -> nn.BatchNorm2d:
    return module_of_type(model, name, nn.BatchNorm2d, f"batch-norm {name!r} of grouped layer {conv_name!r}")


def build_layer_groups(model: nn.Module, config: Mapping[str, Mapping[str, Any]],
                       use_bn: bool = True) -> list[LayerGroups]:
    """LayerGroups from a checkpoint-style config {conv name: {"groups", "free"?, "channels"?}}.

    `channels` defaults to the conv's out_channels and must match it when given.
    With `use_bn`, a BatchNorm2d directly after the conv selects the BN variant of psi.
    """
    result = []
    for name, entry in config.items():
        conv = conv_module(model, name)
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
            conv = conv_module(model, lg.name)
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
