"""Grouping defaults of the architectures `cgl-train` trains (the architectures: dissect.architectures).

Which conv layers are grouped by default, and their LayerGroups (G groups,
free filters, the BatchNorm2d after each conv for the BN variant of psi).
"""
from __future__ import annotations

from torch import nn

from broden.errors import InputError
from cgl_train.groups import GroupSpec, LayerGroups, find_following_bn
from dissect.architectures import DEFAULT_INPUT_SIZE, MIN_INPUT_SIZE, MODELS, build_model
from dissect.models import conv_layer_names

__all__ = ["MODELS", "MIN_INPUT_SIZE", "DEFAULT_INPUT_SIZE", "build_model", "default_group_layer_names",
           "default_group_layers"]


def default_group_layer_names(name: str, model: nn.Module) -> list[str]:
    """Conv layers grouped by default: every conv of the four registered architectures.

    (tiny_cnn: conv1, conv2; alexnet / alexnet_b: the five convs; vgg16: all 13.)
    """
    if name not in MODELS:
        raise InputError(f"unknown architecture {name!r}; valid names: {', '.join(sorted(MODELS))}")
    return conv_layer_names(model)


def default_group_layers(name: str, model: nn.Module, groups: int = 5,
                         layers: list[str] | None = None,
                         group_overrides: dict[str, int] | None = None,
                         free: int | None = None,
                         free_overrides: dict[str, int] | None = None) -> list[LayerGroups]:
    """LayerGroups for the grouped layers of `model` (default layers unless `layers` names them).

    Each layer gets `groups` groups unless `group_overrides[layer]` says otherwise;
    likewise for `free` filters (None: the remainder of channels // groups). The
    BatchNorm2d directly following a conv (AlexNet-B) is attached for the BN variant.
    """
    convs = dict((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    names = list(layers) if layers else default_group_layer_names(name, model)
    group_overrides = dict(group_overrides or {})
    free_overrides = dict(free_overrides or {})
    for label, table in (("groups", group_overrides), ("free", free_overrides)):
        stray = sorted(set(table) - set(names))
        if stray:
            raise InputError(f"--{label} names layer(s) {stray} that are not grouped; "
                             f"grouped layers: {', '.join(names)}")
    result = []
    for layer in names:
        if layer not in convs:
            raise InputError(f"grouped layer {layer!r} is not a Conv2d of {name!r}; "
                             f"conv layers: {', '.join(convs)}")
        g = group_overrides.get(layer, groups)
        fr = free_overrides.get(layer, free)
        channels = convs[layer].out_channels
        if not isinstance(g, int) or g < 1 or g > channels:
            raise InputError(f"layer {layer!r}: groups must be an int in 1..{channels} "
                             f"(its output channels), got {g!r}")
        spec = GroupSpec(channels=channels, groups=g, free=fr)
        result.append(LayerGroups(name=layer, spec=spec, bn=find_following_bn(model, layer)))
    return result
