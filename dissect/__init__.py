"""Network Dissection: label what each unit of a CNN detects, against Broden concepts.

    import dissect
    r = dissect.run("model.pth", "data/broden1_224", out="results/r18", arch="resnet18", layers=["layer4"])
    r = dissect.load("results/r18")   # the same object: r.summary, r.units (DataFrames), r.unit("layer4", 17)

Names are imported on first use (PEP 562), so `import dissect` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule defining it
_EXPORTS = {
    "run": "runner", "load": "runner", "dissect_model": "runner", "RunOutcome": "runner",
    "Dissection": "views", "UnitView": "views",
    "DissectConfig": "config", "LoadOptions": "config", "RunSettings": "config",
    "load_model": "models", "model_from_module": "models", "LoadedModel": "models",
    "run_dissection": "pipeline", "DissectionResult": "results", "load_results": "results",
    "TopQuantile": "stats", "IoUTally": "stats", "TopImages": "stats", "iou_from_counts": "stats",
    "LayerRecorder": "hooks", "make_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule defining `name` on first access."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
