"""One progress-bar helper for the whole toolkit (every package), with a global quiet switch."""
from __future__ import annotations

from typing import Any, Iterable

from tqdm.auto import tqdm

_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Silence (True) or enable (False) every progress bar made by `progress`."""
    global _QUIET
    _QUIET = bool(quiet)


def progress(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """tqdm with the toolkit's quiet switch applied."""
    kwargs.setdefault("disable", _QUIET)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
