"""Software versions recorded beside every result (dissections and training logs alike)."""
from __future__ import annotations

import importlib.metadata
import platform

import numpy as np
import torch

__all__ = ["software_versions"]


def software_versions() -> dict[str, str]:
    """Versions of Python and of every library that can change a number in the outputs."""
    try:
        toolkit = importlib.metadata.version("concept-dissect")
    except importlib.metadata.PackageNotFoundError:
        toolkit = "unknown"
    import PIL
    import torchvision

    # torchvision builds the models and Pillow decodes the images: both can change results
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__, "toolkit": toolkit}
