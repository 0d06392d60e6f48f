"""The one model-input transform: what the dissection feeds a model, and what reports replay."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = ["preprocess"]


def preprocess(images: torch.Tensor, normalization: Mapping[str, Sequence[float]],
               input_size: int | None) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float model input on the images' device.

    Optional square resize (bilinear, antialias) of the 0..1 image, then
    x = (img / 255 - mean) / std (docs/contracts.md conventions).
    """
    x = images.float().div_(255.0)  # (N, 3, H, W)
    if input_size is not None and tuple(x.shape[-2:]) != (input_size, input_size):
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.as_tensor(normalization["mean"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.as_tensor(normalization["std"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
