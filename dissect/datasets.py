"""What a `--dataset` argument names: a Broden directory, a known Broden name, or the synthetic shapes set."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from broden.errors import InputError
from broden.synthetic import DEFAULT_PER_CLASS, DEFAULT_SEED, DEFAULT_SIZE, DEFAULT_VAL_FRACTION

__all__ = ["KNOWN_SYNTHETIC", "SYNTHETIC_DEFAULTS", "synthetic_source", "resolve_dataset"]

log = logging.getLogger(__name__)

KNOWN_SYNTHETIC = "synthetic"
# broden.synthetic's defaults (the paper's set)
SYNTHETIC_DEFAULTS = {"per_class": DEFAULT_PER_CLASS, "size": DEFAULT_SIZE, "seed": DEFAULT_SEED,
                      "val_fraction": DEFAULT_VAL_FRACTION}


def synthetic_source(loaded: Any, per_class: int | None = None,
                     size: int | None = None) -> tuple[dict[str, Any], Path | None]:
    """Parameters of the synthetic set to dissect on, and the checkpoint's own directory if reusable.

    A checkpoint trained with `--data synthetic` names its set in train_options: its
    synthetic_dir is used while it still exists (and no flag overrides), else its parameters
    regenerate the same set. Flags override; without a checkpoint the paper's defaults apply.
    """
    params = dict(SYNTHETIC_DEFAULTS)
    reuse: Path | None = None
    ckpt = getattr(loaded, "checkpoint", None) or {}
    train = ckpt.get("train_options") or {}
    if train.get("data") == KNOWN_SYNTHETIC:
        for key in params:
            if train.get(f"synthetic_{key}") is not None:
                params[key] = train[f"synthetic_{key}"]
        saved = train.get("synthetic_dir")
        if saved and Path(saved).is_dir() and per_class is None and size is None:
            reuse = Path(saved)
    if per_class is not None:
        params["per_class"] = per_class
    if size is not None:
        params["size"] = size
    return params, reuse


def resolve_dataset(name: str | Path, cache_dir: str | Path | None, download: bool, mirrors: list[str],
                    synthetic: dict[str, Any] | None = None, quiet: bool = False,
                    synthetic_reuse: Path | None = None) -> Path:
    """A Broden directory for --dataset: a path (read as it is), a known name in the cache dir (reused
    only when its extraction manifest vouches for it, see broden.download), or 'synthetic'.

    `synthetic`: per_class/size/seed/val_fraction of the synthetic set (default: the paper's),
    generated once under broden.synthetic.synthetic_dir(cache_dir, ...); `synthetic_reuse`: an
    existing generation to use as is (a checkpoint's training set).
    """
    from broden.cache import default_cache_dir

    path = Path(name).expanduser()
    if path.is_dir():
        return path
    name = str(name)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if name == KNOWN_SYNTHETIC:
        from broden.synthetic import generate_shapes_dataset, synthetic_dir

        if synthetic_reuse is not None:
            log.info("dissecting on the checkpoint's training set %s", synthetic_reuse)
            return Path(synthetic_reuse)
        params = {**SYNTHETIC_DEFAULTS, **(synthetic or {})}
        target = synthetic_dir(cache, **params)
        return Path(generate_shapes_dataset(target, **params, progress=not quiet, option="--cache-dir"))
    from broden.download import DATASETS, download_dataset, get_spec

    if name not in DATASETS:
        raise InputError(f"--dataset {name!r}: not a directory, and not a known name "
                         f"({', '.join(sorted(DATASETS))}, {KNOWN_SYNTHETIC})")
    spec = get_spec(name)
    where = cache / "datasets"
    final = where / spec.top_dir
    if final.exists() or final.is_symlink():
        # A copy under the known name is reused only as `dissect download` reuses it: when its extraction
        # manifest vouches for it, else re-extracted from the verified zip beside it, else refused
        # naming the directory. With the directory there, download_dataset never touches the network.
        return Path(download_dataset(name, where, mirrors=mirrors, progress=not quiet))
    if not download:
        raise InputError(f"--dataset {name}: not found in {where}; add --download to fetch it, or pass "
                         f"the path of an extracted copy (--dataset /path/to/{spec.top_dir})")
    return Path(download_dataset(name, where, mirrors=mirrors, progress=not quiet))
