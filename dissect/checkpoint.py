"""The checkpoint format that `cgl-train` writes and `dissect run` reads (defined here, in the reader's package).

A checkpoint is one dict of plain Python values and tensors, so it loads with
`torch.load(..., weights_only=True)`: no pickled classes, no code runs on load.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from broden.errors import InputError
from broden._fileio import atomic_path

__all__ = ["FORMAT", "VERSION", "REQUIRED_FIELDS", "CheckpointError", "make_checkpoint",
           "save_checkpoint", "load_checkpoint", "is_checkpoint"]

FORMAT = "cgl-checkpoint"
VERSION = 1
REQUIRED_FIELDS = ("format", "version", "arch", "arch_kwargs", "state_dict", "groups",
                   "normalization", "input_size")


class CheckpointError(InputError):
    """A file is not a valid checkpoint; the message names the file and the field."""


def make_checkpoint(*, arch: str, arch_kwargs: dict[str, Any], state_dict: dict[str, torch.Tensor],
                    groups: dict[str, dict[str, int]], normalization: dict[str, list[float]],
                    input_size: int | None, train_options: dict[str, Any] | None = None,
                    metrics: dict[str, float] | None = None, epoch: int = 0, seed: int | None = None,
                    **extra: Any) -> dict[str, Any]:
    """Assemble a checkpoint dict; `extra` holds training state (optimizer, scheduler, ...)."""
    ckpt = {
        "format": FORMAT,
        "version": VERSION,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "groups": {k: dict(v) for k, v in groups.items()},
        "normalization": {"mean": [float(x) for x in normalization["mean"]],
                          "std": [float(x) for x in normalization["std"]]},
        "input_size": input_size,
        "train_options": dict(train_options or {}),
        "metrics": dict(metrics or {}),
        "epoch": int(epoch),
        "seed": seed,
    }
    ckpt.update(extra)
    return ckpt


def is_checkpoint(obj: Any) -> bool:
    """True when `obj` (a loaded object) looks like one of our checkpoints."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def validate_checkpoint(obj: Any, path: str | Path = "<memory>") -> dict[str, Any]:
    """Raise CheckpointError naming the file and the first missing or malformed field (types included)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: a checkpoint is a dict, got {type(obj).__name__}")
    if obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: field 'format' is {obj.get('format')!r}, expected {FORMAT!r}")
    for name in REQUIRED_FIELDS:
        if name not in obj:
            raise CheckpointError(f"{path}: missing field {name!r} (a {FORMAT} has {', '.join(REQUIRED_FIELDS)})")
    # every reader indexes these fields directly: a wrong type must fail here, naming the field,
    # not later as a bare TypeError
    for check in (_check_version, _check_arch, _check_state_dict, _check_groups, _check_normalization,
                  _check_optional):
        problem = check(obj)
        if problem is not None:
            raise CheckpointError(f"{path}: field {problem}")
    return obj


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_version(obj: dict[str, Any]) -> str | None:
    version = obj["version"]
    if not _is_int(version) or version < 1:
        return f"'version' is {version!r}, expected a positive integer"
    if version > VERSION:
        return f"'version' is {version}, this toolkit reads up to {VERSION}"
    return None


def _check_arch(obj: dict[str, Any]) -> str | None:
    if not isinstance(obj["arch"], str) or not obj["arch"]:
        return f"'arch' is {obj['arch']!r}, expected an architecture name (a string)"
    kwargs = obj["arch_kwargs"]
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        return f"'arch_kwargs' is a {type(kwargs).__name__}, expected a dict of constructor arguments by name"
    size = obj["input_size"]
    if size is not None and (not _is_int(size) or size <= 0):
        return f"'input_size' is {size!r}, expected a positive integer (pixels) or null"
    return None


def _check_state_dict(obj: dict[str, Any]) -> str | None:
    sd = obj["state_dict"]
    if not isinstance(sd, dict):
        return f"'state_dict' is a {type(sd).__name__}, expected a dict of parameter name -> tensor"
    for key, value in sd.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            return (f"'state_dict' entry {key!r} is a {type(value).__name__}, expected a tensor "
                    f"under a string name")
    return None


def _check_groups(obj: dict[str, Any]) -> str | None:
    groups = obj["groups"]
    if not isinstance(groups, dict):
        return f"'groups' is a {type(groups).__name__}, expected a dict of layer name -> {{'groups': G, ...}}"
    for layer, cfg in groups.items():
        if not isinstance(cfg, dict) or "groups" not in cfg:
            return f"'groups.{layer}' needs a 'groups' count"
        for key, value in cfg.items():
            if not _is_int(value) or value < 0:
                return f"'groups.{layer}.{key}' is {value!r}, expected a non-negative integer"
        if cfg["groups"] < 1:
            return f"'groups.{layer}.groups' is {cfg['groups']}, expected a positive integer"
    return None


def _check_normalization(obj: dict[str, Any]) -> str | None:
    norm = obj["normalization"]
    expected = "'normalization' needs 'mean' and 'std' with 3 finite numbers each (std > 0)"
    if not isinstance(norm, dict):
        return f"{expected}, got a {type(norm).__name__}"
    for key in ("mean", "std"):
        values = norm.get(key)
        if not isinstance(values, (list, tuple)) or len(values) != 3 or not all(map(_is_number, values)):
            return f"{expected}; {key!r} is {values!r}"
    if any(s <= 0 for s in norm["std"]):
        return f"{expected}; 'std' is {norm['std']!r}"
    return None


def _check_optional(obj: dict[str, Any]) -> str | None:
    """Fields make_checkpoint always writes but older or foreign files may lack: checked when present."""
    for name in ("train_options", "metrics"):
        if obj.get(name) is not None and not isinstance(obj[name], dict):
            return f"{name!r} is a {type(obj[name]).__name__}, expected a dict"
    if "epoch" in obj and (not _is_int(obj["epoch"]) or obj["epoch"] < 0):
        return f"'epoch' is {obj['epoch']!r}, expected a non-negative integer"
    if obj.get("seed") is not None and not _is_int(obj["seed"]):
        return f"'seed' is {obj['seed']!r}, expected an integer or null"
    return None


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> Path:
    """Write atomically: a temporary file in the same directory, then rename."""
    path = Path(path)
    validate_checkpoint(ckpt, path)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint with weights_only=True."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; expected a {FORMAT} file (written by cgl-train)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt or foreign file
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch file: {e}") from e
    return validate_checkpoint(obj, path)
