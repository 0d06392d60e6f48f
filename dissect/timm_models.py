"""timm models (`--arch timm:NAME`), an optional extra: `pip install 'concept-dissect[timm]'`.

The model is built with timm.create_model(NAME, pretrained=False): nothing is downloaded; the
weights come from the file given as MODEL (a checkpoint of timm's train.py holds them under
'state_dict', with 'arch' and the run's argparse 'args'). Its preprocessing comes from timm's
own resolver (timm.data.resolve_data_config): the training arguments' input_size / img_size /
mean / std when the checkpoint records them, else the model's pretrained_cfg.
"""
from __future__ import annotations

import argparse
from typing import Any, Mapping

from torch import nn

from broden.errors import InputError

__all__ = ["timm_available", "build_timm", "timm_preprocessing", "INSTALL_HINT"]

INSTALL_HINT = "pip install 'concept-dissect[timm]' (or pip install timm)"


def _timm() -> Any:
    try:
        import timm
    except ImportError as e:
        raise InputError(f"--arch timm:NAME needs the timm package, which is not installed: {INSTALL_HINT}") from e
    return timm


def timm_available() -> bool:
    """Whether timm can be imported (the optional [timm] extra)."""
    try:
        _timm()
    except InputError:
        return False
    return True


def build_timm(name: str, kwargs: Mapping[str, Any], source: str) -> nn.Module:
    """timm.create_model(name, pretrained=False, **kwargs) (num_classes from the weights); InputError if unknown."""
    timm = _timm()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:10]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise InputError(f"{source}: unknown timm architecture {name!r} (--arch timm:NAME){hint}")
    try:
        return timm.create_model(name, pretrained=False, **dict(kwargs))
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"{source}: cannot build timm architecture {name!r} with arguments {dict(kwargs)!r}: "
                         f"{e}") from e


def _train_args(obj: Any) -> dict[str, Any]:
    """The training run's arguments a timm train.py checkpoint saves ('args': a Namespace or a dict)."""
    args = obj.get("args") if isinstance(obj, Mapping) else None
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    return dict(args) if isinstance(args, Mapping) else {}


def timm_preprocessing(module: nn.Module, obj: Any) -> tuple[dict[str, list[float]], int | None, str]:
    """(mean/std, native input size, where they came from) of a timm model and the file it was loaded from.

    A non-square input size has no single native size: None (the images keep their size unless
    --input-size says otherwise).
    """
    from timm.data import resolve_data_config

    args = _train_args(obj)
    keys = ("input_size", "img_size", "mean", "std", "in_chans")
    given = {k: args[k] for k in keys if args.get(k) is not None}
    config = resolve_data_config(given, model=module)
    norm = {"mean": [float(v) for v in config["mean"]], "std": [float(v) for v in config["std"]]}
    _, h, w = (int(v) for v in config["input_size"])
    origin = "timm train.py args" if given else "timm config"
    return norm, (h if h == w else None), origin
