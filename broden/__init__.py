"""Broden-format datasets: read (format), serve as tensors (dataset), decode once (cache, cache_writer),
load ahead of compute (loader), write (writer).

Public names of every submodule are importable from `broden` directly; each
submodule is imported on first use, so `import broden` stays cheap (no torch).
"""
from __future__ import annotations

import importlib
from typing import Any

# name -> submodule defining it
_EXPORTS = {
    "InputError": "errors", "BrodenFormatError": "errors",
    "encode_label_png": "writer", "BrodenWriter": "writer", "LabelSpec": "writer",
    "INDEX_FIXED_COLUMNS": "format", "LabelInfo": "format", "ImageRecord": "format", "BrodenMeta": "format",
    "decode_label_png": "format", "decode_image": "format", "decode_record_image": "format",
    "load_meta": "format", "validate": "format",
    "check_label_plane": "format", "check_uniform_sizes": "format", "known_id_table": "format",
    "BrodenDataset": "dataset", "collate": "dataset", "SPLITS": "dataset",
    "CACHE_FORMAT": "cache", "CACHE_VERSION": "cache", "DecodedCache": "cache",
    "source_fingerprint": "cache", "default_cache_dir": "cache", "build_cache": "cache",
    "open_cache": "cache", "open_decoded": "cache", "FINGERPRINT_MODES": "cache",
    "CacheWriter": "cache_writer", "CacheSpaceError": "cache_writer",
    "Prefetcher": "loader", "iter_batches": "loader", "thread_plan": "loader",
}
# submodules whose whole __all__ is re-exported (imported only when one of their names is asked for)
_WHOLE_MODULES = ("download", "synthetic")

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule defining `name` on first access (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is not None:
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    for submodule in _WHOLE_MODULES:
        mod = importlib.import_module(f"{__name__}.{submodule}")
        if name in mod.__all__:
            return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
