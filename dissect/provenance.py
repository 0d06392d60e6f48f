"""Software versions (and the CPU) recorded beside every result (dissections and training logs alike)."""
from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path

import numpy as np
import torch

__all__ = ["software_versions", "cpu_description"]


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
            "numpy": np.__version__, "pillow": PIL.__version__, "toolkit": toolkit, "cpu": cpu_description()}


def cpu_description(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name and the instruction set torch's CPU kernels use, e.g. 'Intel(R) Xeon(R) (AVX512)'.

    Float results, and so training runs, differ between kernels for different instruction sets
    (bfloat16 on AMX, say): the same seed on another CPU is a different run.
    """
    model = ""
    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            if line.lower().startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown"
    return f"{model} ({torch.backends.cpu.get_cpu_capability()})"
