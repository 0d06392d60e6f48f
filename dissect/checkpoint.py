"""The checkpoint format that `cgl-train` writes and `dissect run` reads (defined here, in the reader's package).

A checkpoint is one dict of plain Python values and tensors, so it loads with
`torch.load(..., weights_only=True)`: no pickled classes, no code runs on load.
"""
from __future__ import annotations

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
    """Raise CheckpointError naming the file and the first missing or malformed field."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: a checkpoint is a dict, got {type(obj).__name__}")
    if obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: field 'format' is {obj.get('format')!r}, expected {FORMAT!r}")
    for name in REQUIRED_FIELDS:
        if name not in obj:
            raise CheckpointError(f"{path}: missing field {name!r} (a {FORMAT} has {', '.join(REQUIRED_FIELDS)})")
    if obj["version"] > VERSION:
        raise CheckpointError(f"{path}: field 'version' is {obj['version']}, this toolkit reads up to {VERSION}")
    norm = obj["normalization"]
    if not (isinstance(norm, dict) and len(norm.get("mean", [])) == 3 and len(norm.get("std", [])) == 3):
        raise CheckpointError(f"{path}: field 'normalization' needs 'mean' and 'std' with 3 values each")
    for layer, cfg in obj["groups"].items():
        if not isinstance(cfg, dict) or "groups" not in cfg:
            raise CheckpointError(f"{path}: field 'groups.{layer}' needs a 'groups' count")
    return obj


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
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt or foreign file
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch file: {e}") from e
    return validate_checkpoint(obj, path)
