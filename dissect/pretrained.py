"""torchvision's pretrained weights (`--arch resnet18 --weights IMAGENET1K_V1`), read offline.

The weights file is looked up where torch.hub keeps it, `$TORCH_HOME/hub/checkpoints/<the
file name the weights' url ends with>` (torch.hub.get_dir()), and is never downloaded: this
toolkit runs where there is no network, and a run must not depend on one. The file is read
with torch.load(weights_only=True); when its name carries torch.hub's hash prefix
(`resnet18-f37072fd.pth`), the file's sha256 must start with it, as torchvision checks on
download. The weights' own preprocessing (mean/std, crop size) is the default of
--normalize and --input-size; summary.json records which came from where.
dissect.models.load_requested builds the LoadedModel from these pieces.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch

from broden.download import sha256_file
from broden.errors import InputError

__all__ = ["resolve_weights", "weights_file", "hash_prefix", "weights_transforms", "read_verified",
           "constructor_kwargs", "renamed_keys"]



def resolve_weights(arch: str, weights: str) -> Any:
    """The torchvision WeightsEnum member `weights` ('IMAGENET1K_V1', 'DEFAULT', 'ResNet18_Weights.X') of `arch`."""
    from torchvision.models import get_model_weights, list_models

    import torchvision

    if arch not in list_models(module=torchvision.models):
        raise InputError(f"--arch {arch} --weights {weights}: {arch!r} is not a torchvision classification model; "
                         f"--weights names torchvision's pretrained weights (valid --arch names: "
                         f"{', '.join(list_models(module=torchvision.models))})")
    enum = get_model_weights(arch)
    name = weights.split(".", 1)[1] if weights.startswith(enum.__name__ + ".") else weights
    valid = ", ".join(list(enum.__members__))
    if "." in name:
        raise InputError(f"--weights {weights}: names weights of another model than {arch!r}; valid for "
                         f"{arch}: {valid}")
    try:
        return enum[name]
    except KeyError:
        raise InputError(f"--weights {weights}: not a weights name of torchvision's {arch}; valid: {valid}") from None


def weights_file(entry: Any) -> Path:
    """Where torch.hub caches the file of `entry`: <torch.hub.get_dir()>/checkpoints/<url's last part>."""
    name = entry.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def hash_prefix(name: str) -> str | None:
    """The sha256 prefix a torch.hub file name carries (`resnet18-f37072fd.pth` -> 'f37072fd'), or None."""
    match = torch.hub.HASH_REGEX.search(name)  # torch.hub's own rule, so a file it accepts is accepted here
    return match.group(1) if match and match.group(1) else None


def weights_transforms(entry: Any) -> dict[str, Any]:
    """The weights' preprocessing (torchvision's ImageClassification preset): sizes, mean/std, interpolation."""
    preset = entry.transforms()
    out: dict[str, Any] = {"preset": type(preset).__name__}
    for key in ("resize_size", "crop_size", "mean", "std"):
        value = getattr(preset, key, None)
        out[key] = [float(v) if key in ("mean", "std") else int(v) for v in value] if value is not None else None
    interpolation = getattr(preset, "interpolation", None)
    out["interpolation"] = getattr(interpolation, "value", None)
    out["antialias"] = getattr(preset, "antialias", None)
    # the label maps cover the whole image, so a centre crop would cut concepts the tally needs: the
    # dissection resizes the whole image to crop_size instead (dissect.preprocess)
    out["applied"] = "whole image resized to crop_size x crop_size (bilinear, antialiased); no centre crop"
    return out


def _missing_message(path: Path, entry: Any, arch: str) -> str:
    return (f"--weights {entry!r}: the weights file {path} is not there. There is no network here and this "
            f"toolkit never downloads model weights: fetch {entry.url} on a machine with network and copy it "
            f"to {path} (the directory is $TORCH_HOME/hub/checkpoints; set TORCH_HOME to use another), or, "
            f"where torchvision may download, run python -c \"import torchvision; "
            f"torchvision.models.get_model('{arch}', weights='{entry!r}')\" once")


def read_verified(path: Path, entry: Any, arch: str) -> tuple[Mapping[str, torch.Tensor], str]:
    """(state_dict, sha256) of the weights file, its hash prefix checked; InputError naming the file otherwise."""
    if not path.is_file():
        raise InputError(_missing_message(path, entry, arch))
    digest = sha256_file(path)
    prefix = hash_prefix(path.name)
    if prefix is not None and not digest.startswith(prefix):
        raise InputError(f"{path}: sha256 {digest} does not start with {prefix}, the hash prefix in the file "
                         f"name: the file is corrupt, truncated or not the weights {entry!r}; fetch "
                         f"{entry.url} again")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt or foreign file
        raise InputError(f"{path}: cannot be read as torchvision weights (a state_dict): {e}") from e
    if not (isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise InputError(f"{path}: holds a {type(obj).__name__}, expected a state_dict (name -> tensor) as "
                         f"torchvision publishes for {entry!r}")
    return obj, digest


# DenseNet files keep their original key names ('denselayer1.norm.1.weight'); torchvision renames them
# on load ('denselayer1.norm1.weight'), so reading the file without torchvision's loader must too.
_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|"
                           r"running_var))$")


def renamed_keys(arch: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not arch.startswith("densenet"):
        return dict(state_dict)
    out = {}
    for key, value in state_dict.items():
        match = _DENSENET_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def constructor_kwargs(arch: str, entry: Any) -> dict[str, Any]:
    """What torchvision's builders set when given weights (torchvision.models.*: the weights' own layout)."""
    meta = entry.meta
    kwargs: dict[str, Any] = {"num_classes": len(meta["categories"])}
    if arch in ("googlenet", "inception_v3"):
        # the published weights expect these inputs and carry the auxiliary classifier's weights
        kwargs.update(transform_input=True, aux_logits=True, init_weights=False)
    elif arch.startswith("vit_"):
        kwargs["image_size"] = meta["min_size"][0]
    elif arch.startswith("maxvit"):
        kwargs["input_size"] = meta["min_size"]
    return kwargs
