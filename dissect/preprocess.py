"""The one model-input transform: what the dissection feeds a model, and what reports replay."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = ["preprocess", "input_table"]


def input_table(normalization: Mapping[str, Sequence[float]]) -> torch.Tensor:
    """(3, 256) float32: the model input of each uint8 value of each channel, in the reference's arithmetic.

    NetDissect-Lite subtracts its mean pixel from the float32 image on the 0..255 scale (numpy
    computes it in float64 and rounds once to float32), then divides the float32 tensor by
    255 * 0.224. Here x = float32(v - 255 * mean) / float32(255 * std), which is that arithmetic bit
    for bit for `--normalize lite` and (img / 255 - mean) / std within an ulp for every normalisation.
    """
    v = torch.arange(256, dtype=torch.float64)
    mean = torch.as_tensor(normalization["mean"], dtype=torch.float64) * 255.0  # (3,)
    std = (torch.as_tensor(normalization["std"], dtype=torch.float64) * 255.0).float()  # (3,)
    centred = (v[None, :] - mean[:, None]).float()  # (3, 256): one rounding, as numpy's in-place subtract
    return centred / std[:, None]


def preprocess(images: torch.Tensor, normalization: Mapping[str, Sequence[float]],
               input_size: int | None) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 model input on the images' device.

    Without a resize, x = (img / 255 - mean) / std in the reference's arithmetic (`input_table`,
    looked up per pixel: a uint8 channel has only 256 values). With `input_size`, a square
    bilinear antialiased resize of the 0..1 image, then the formula in float32
    (docs/contracts.md conventions).
    """
    if input_size is None or tuple(images.shape[-2:]) == (input_size, input_size):
        table = input_table(normalization).to(images.device).reshape(-1)  # (768,)
        offset = (torch.arange(3, device=images.device, dtype=torch.int32) * 256).view(1, 3, 1, 1)
        index = images.to(torch.int32) + offset  # (N, 3, H, W) into the flat table
        return table.index_select(0, index.reshape(-1)).view(images.shape)
    x = images.float().div_(255.0)  # (N, 3, H, W)
    x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.as_tensor(normalization["mean"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.as_tensor(normalization["std"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
