"""Choose the torch device once, at the edge (`--device auto|cpu|cuda|cuda:N`)."""
from __future__ import annotations

import torch

from broden.errors import InputError


def parse_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else is parsed by torch and checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise InputError(f"--device {name!r}: not a device name (expected auto, cpu, cuda, cuda:N)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device
